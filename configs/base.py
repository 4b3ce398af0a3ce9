"""Default configuration: SSL-regularised two-tower model (CFM masking) on the embedded dataset.

Every field of every run lives here, with one comment each; variants import this file and
override a few fields. Override from the command line: ``--config.ssl.alpha=0.3``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds the streams' shuffles, the init and the step rngs (the data: data.seed)

  c.data = ml_collections.ConfigDict()
  c.data.seed = 0  # seeds the data: generator, train_fraction subsample, ... (-1: seed's value)
  c.data.name = "synthetic"  # 'synthetic' | 'mechanism' (both embedded) | 'movielens' | 'files'
  c.data.path = ""  # movielens / files: the data folder (MovieLens: its GroupLens layout)
  c.data.min_rating = 4.0  # movielens / files: rating (files: weight) >= this is a positive
  c.data.split = "global"  # movielens / files: eval after one time cutoff 'global' | per 'user'
  c.data.eval_fraction = 0.2  # movielens / files: the latest fraction of interactions is test
  # movielens / files: the slice just before test is validation (synthetic: half the held-out users)
  c.data.valid_fraction = 0.1
  c.data.history_length = 20  # movielens: items in the query's 'history' feature (0 = none)
  c.data.query_mode = "user"  # movielens / files: query = a user 'user' | an item 'item' (i2i)
  c.data.unknown_items = "drop"  # movielens / files: keys absent from their table: 'drop' | 'error'
  c.data.train_fraction = 1.0  # any source: seeded random fraction of D_train kept (eval same)
  c.data.num_items = 20_000  # synthetic: catalogue size (D_item)
  c.data.num_queries = 40_000  # synthetic: queries (users); the last 20% are held out for eval
  c.data.num_train_pairs = (
    300_000  # synthetic: D_train (query, item) pairs, power-law item marginal
  )
  c.data.num_eval_pairs = (
    20_000  # synthetic: held-out pairs (validation + test users) from the held-out queries
  )
  c.data.popularity_exponent = 1.1  # synthetic: item popularity ~ rank^-exponent
  c.data.feature_noise = 0.1  # synthetic / mechanism: prob. a feature value is replaced by noise
  c.data.nuisance_values = 32  # mechanism: values of each group's nuisance (1 = no nuisance)
  c.data.embed_dim = 32  # embedding width of every feature
  c.data.num_threads = 2  # grain read threads per stream
  c.data.prefetch = 4  # grain prefetch buffer (batches) per stream
  c.data.device_prefetch = 2  # steps whose batches are on the devices ahead of the step (>= 1)
  c.data.files = ml_collections.ConfigDict()  # files: tables and schema (docs/data.md)
  c.data.files.interactions = "interactions.csv"  # files: interactions (.csv | .parquet) table
  c.data.files.item_table = "items.csv"  # files: item feature table, one row per item key
  c.data.files.query_table = ""  # files: query feature table, one row per query key ('' = none)
  c.data.files.query_key = "query_id"  # files: query key column (interactions and query table)
  c.data.files.item_key = "item_id"  # files: item key column (interactions and item table)
  c.data.files.timestamp = ""  # files: interactions time column ('' = the rows are in time order)
  c.data.files.weight = ""  # files: interactions weight column ('' = every row is a positive pair)
  c.data.files.item_name = ""  # files: item table column of display names ('' = none)
  c.data.files.csv_separator = ","  # files: field separator of .csv tables
  c.data.files.item_features = ml_collections.ConfigDict()  # files: {feature: {kind, column, ...}}
  c.data.files.query_features = ml_collections.ConfigDict()  # files: the same (+ kind 'history')

  c.model = ml_collections.ConfigDict()
  c.model.query_hidden = (256,)  # query tower hidden layer widths
  c.model.item_hidden = (256,)  # item tower hidden layer widths
  c.model.output_dim = 64  # embedding width of both towers (retrieval space)
  c.model.table_row_multiple = 128  # table rows padded to a multiple (row shards must divide it)
  c.model.replicate_table_rows = 0  # tables with fewer rows are replicated, not row-sharded
  c.model.dtype = "float32"  # compute dtype of the towers: 'float32' | 'bfloat16'
  # training: prob. each query feature of a pair is replaced by its learned default (0 = off)
  c.model.query_feature_dropout = 0.0
  c.model.share_item_tables = False  # data.query_mode='item': query tower reads the item tables

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.05  # batch softmax temperature (main task)
  c.loss.logq_correction = True  # subtract log(item sampling prob. in D_train) from logits
  c.loss.remove_accidental_hits = True  # same item elsewhere in the batch is not a negative
  # where logQ's sampling probabilities come from: 'counts' (static D_train counts) | 'streaming'
  # (learnt online by the train step, sslrec/frequency.py; Yi et al. 2019)
  c.loss.logq_source = "counts"
  c.loss.frequency_buckets = 1 << 20  # streaming: hash buckets per hash function
  c.loss.frequency_hashes = 2  # streaming: hash functions (the most conservative estimate wins)
  c.loss.frequency_learning_rate = 0.05  # streaming: the moving average step (paper: alpha)
  c.loss.mixed_negatives = False  # the D_item batch also serves as negatives (Yang et al. 2020)
  c.loss.logq_mode = "standard"  # 'standard' | 'corrected' (positive not corrected; RecSys'25)

  c.ssl = ml_collections.ConfigDict()
  c.ssl.alpha = 1.0  # weight of L_self in L_main + alpha * L_self (0 = SSL off)
  c.ssl.temperature = 0.1  # SSL InfoNCE temperature
  # feature masking: 'cfm' (correlated) | 'rfm' (random) | 'none' | 'cfm_ids_random' | controls
  # 'anti_cfm' (seed + least correlated) and 'oracle' (declared groups; embedded data only)
  c.ssl.masking = "cfm"
  # MI that CFM / anti_cfm rank by: 'permutation' (bias-corrected) | 'plugin' (docs/method.md)
  c.ssl.mi_estimator = "permutation"
  c.ssl.rank_ids = False  # per-item id features in the MI ranking (False: on a random side)
  c.ssl.mask_fraction = 0.5  # fraction of features view 1 masks (view 2 masks the rest)
  c.ssl.dropout_rate = 0.2  # per-value dropout of multi-valued features, in [0, 1)
  c.ssl.item_sampling = (
    "uniform"  # SSL items: 'uniform' over the catalogue | 'train' (D_train marginal)
  )
  c.ssl.batch_size = 512  # SSL items per step (the D_item stream)
  c.ssl.encoder_sharing = (
    "all_but_last"  # SSL encoder reuses item MLP: 'all' | 'all_but_last' | 'none'
  )
  # first layer on the two views: 'stacked' (one [2N, F] product) | 'blocks' (each view's kept
  # feature blocks gathered into one product: half the FLOPs; no faster on 2 CPU cores)
  c.ssl.view_encoding = "stacked"

  c.reg = ml_collections.ConfigDict()
  c.reg.spread_out_weight = 0.0  # weight of the spread-out regulariser on D_item embeddings

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adagrad"  # 'adagrad' | 'adam'
  c.optimizer.learning_rate = 0.2  # peak learning rate
  c.optimizer.warmup_steps = 100  # linear warmup steps
  c.optimizer.grad_clip_norm = 10.0  # global-norm gradient clipping (0 = off)
  c.optimizer.embedding_update = (
    "sparse"  # tables: 'sparse' (touched rows only, row-wise optimizer) | 'dense' (optax above)
  )
  c.optimizer.embedding_optimizer = "rowwise_adagrad"  # sparse: 'rowwise_adagrad' | 'lazy_adam'
  c.optimizer.embedding_learning_rate = 0.2  # sparse: learning rate of the table rows (same warmup)
  c.optimizer.sparse_min_rows = (
    0  # sparse: smaller tables keep the dense optimizer (0 = every table sparse)
  )
  # sparse: how row-sharded tables are reached: 'gather' (global dedupe; traffic grows with the
  # devices) | 'owner' (ids all-to-all to the row's shard; traffic constant in the devices)
  c.optimizer.embedding_routing = "gather"
  c.optimizer.routing_capacity = 2.0  # owner: per-destination ids = ceil(this * slots / devices)
  c.optimizer.embedding_initial_accumulator = (
    0.0  # sparse rowwise_adagrad start; 0 = batch-aware 400 / train.batch_size**2 (docs/method.md)
  )

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 3000  # total train steps (when train.num_epochs is 0)
  c.train.num_epochs = 0.0  # > 0: train this many epochs of D_train instead of num_steps
  c.train.batch_size = 512  # (query, item) pairs per step; in-batch negatives span all of them
  c.train.log_every = 100  # steps between metrics.jsonl lines / progress lines
  c.train.eval_every = 1000  # steps between evaluations (and always at the end)
  c.train.eval_every_epochs = 0.0  # > 0: evaluate every this many epochs of D_train instead
  c.train.checkpoint_every = 1000  # steps between checkpoints (and always at the end)
  c.train.max_checkpoints = 3  # checkpoints kept
  c.train.skip_nonfinite = False  # non-finite loss/grad: False = stop the run, True = skip update
  c.train.select_metric = (
    "recall@50"  # validation metric that selects the checkpoint tested at the end
  )
  c.train.early_stopping_patience = (
    0  # stop after this many validations without improvement (0 = off)
  )
  c.train.profile_steps = ()  # (FIRST, LAST): jax.profiler trace of these steps in WORKDIR/profile

  c.eval = ml_collections.ConfigDict()
  c.eval.ks = (10, 50, 100)  # Recall@K cut-offs
  c.eval.head_fraction = 0.2  # head = the most popular fraction of the catalogue (train freq.)
  c.eval.batch_size = 1024  # queries / items embedded and scored per chunk
  c.eval.max_queries = 0  # evaluate on at most this many held-out pairs (0 = all)
  c.eval.references = (
    "popularity",
    "itemknn",
  )  # classical references scored beside the model ('als' needs the refs extra)
  # model ranks by <q, x> + this * loss.temperature * log(1 + D_train freq.) (sslrec/prior.py)
  c.eval.popularity_prior = 0.0
  # > 0 values: after training, the prior's weight is chosen among these (and the one above) on
  # validation with the selected checkpoint, and the test split is scored with it
  c.eval.popularity_prior_candidates = ()
  c.eval.exclude_train_items = True  # rank without each eval query's training-period items

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1,)  # device mesh shape; -1 = all remaining devices
  c.mesh.axes = ("data",)  # mesh axis names; batches are sharded on 'data'
  # CPU hosts: 0 = one device, XLA's threads over every core (measured fastest); n = n devices
  c.mesh.cpu_devices = 0
  return c

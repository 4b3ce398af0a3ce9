"""Error types shared by modules that must not import each other (no import cycles)."""


class ConfigError(ValueError):
  """An invalid config value; the message names the field and what is allowed."""

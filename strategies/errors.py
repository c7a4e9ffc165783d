"""The errors of the strategies library; each message names the setting or module and the fix."""


class SettingsError(ValueError):
    """A settings mapping (a config section) is wrong: unknown key, wrong type or value out of range."""


class StrategyConfigError(SettingsError):
    """A strategy setting is wrong; the message names the field and what to do."""


class ModelStructureError(ValueError):
    """The model's parts cannot be read from its structure; the message says how to name them."""

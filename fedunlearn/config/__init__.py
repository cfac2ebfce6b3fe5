"""The typed, frozen config tree (:mod:`.tree`), the registry every configured name goes through
(:mod:`.registry`) and the loading of users' extension modules (:mod:`.extensions`)."""

from fedunlearn.config.tree import Config, from_run_dict, load_config

__all__ = ["Config", "from_run_dict", "load_config"]

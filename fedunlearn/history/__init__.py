"""The run's history on disk: the store of per-round updates (:mod:`.store`) and the lineage log
(:mod:`.lineage`). Neither imports anything else of the project."""

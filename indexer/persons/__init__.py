"""Persons: the clustering of faces over the store, its stable ids and names, the user's edits, the artefacts.

``recluster`` computes and applies clusterings (also in the daemon's background), ``people`` lists, shows, names
and merges persons, ``state`` persists the current clustering, ``artefacts`` writes the seed's files. The pure
algorithms they run live in ``indexer.cluster``.
"""

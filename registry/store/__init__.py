"""The store half of the registry: LanceDB tables and blobs, no tensors.

``store`` (opening, tables, versions, reads), ``search`` (channels, RRF), ``maintenance``
(indexes, optimize), ``prune`` (vanished files), ``blobstore`` and ``schema``.
"""

"""The store half of the registry: LanceDB tables and blobs, no tensors.

``store`` (opening, tables, versions, reads), ``search`` (channels), ``fusion`` (their lists'
scores fused), ``maintenance`` (indexes, optimize), ``prune`` (vanished files), ``blobstore`` and
``schema``.
"""

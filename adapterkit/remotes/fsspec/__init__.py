"""The built-in remote: an adapterkit store on a file system, local, S3 or in memory.

``locations`` parses URLs, ``backends`` holds each file system's reads and conditional writes
(``s3`` its multipart uploads and ETag preconditions), ``remote`` the push/pull protocol.

``file:///srv/ak`` (or a bare path), ``s3://bucket/prefix`` and ``memory://name`` all hold a store
with the local store's layout (docs/store-format.md): ``store.json``, ``blobs/sha256/<2>/<62>``,
``manifests/sha256/<2>/<62>``, ``refs/<name>/_tags/<tag>``. A directory pushed to is therefore a
store that ``adapterkit --store`` opens as it is, and a copy of a store (``rsync``, ``aws s3 sync``)
is a remote.

Push sends only the objects the remote lacks, blobs before the manifest, each re-hashed on the way
out so a damaged local blob never reaches the remote; then it moves the remote ref by
compare-and-swap against the value it read before uploading (another push that moved the ref
meanwhile wins, and this one gets :class:`RemoteConflictError`). Pull fetches the manifest by
digest and checks it, streams each missing blob into the local store while hashing it (a blob that
does not hash to its name raises before it is published, so nothing damaged ever gets a name), and
writes the local ref last, all under the local store's gc lock. A pull that fails half-way leaves at
most complete, unreferenced objects, which a re-run reuses and ``gc`` otherwise collects.

What each backend guarantees::

    backend  objects (blobs, manifests)              remote ref
    file     the store's own writer: temp, fsync,    flock + compare + rename, with a reflog,
             link; under the remote's gc lock        under the remote store's gc lock
    s3       PUT If-None-Match: *                    new ref: PUT If-None-Match: *;
                                                     existing ref: PUT If-Match: <its ETag>
    memory   one in-process lock (memory:// lives    the same lock
             in one process, so this is exact)

Only the file backend keeps a reflog on the remote (S3 has no append). An S3 ref that another push
rewrote with the same digest still counts as a win for both. Other fsspec file systems would get
the memory backend's code without its lock: check-then-write, no compare-and-swap.

URL rules (names contain ``/``, so the store root is found by looking for ``store.json``):

* pull ``SOURCE``: ``ROOT/NAME[:TAG]``, ``ROOT/NAME@sha256:<hex>`` or ``ROOT/sha256:<hex>`` (with a
  local tag). ROOT is the nearest ancestor of the last path segment that holds ``store.json``.
* push ``DEST``: a store root (``store.json`` there) receives the adapter under the pushed ref's
  name and tag. ``DEST/NAME:TAG`` (the last segment has a ``:``) renames it, inside the nearest
  ancestor that is a store; such a store must already exist. Any other DEST that is not a store
  becomes a new one, provided it is empty and not inside another store (nested stores would make
  names ambiguous).
"""

from adapterkit.remotes.fsspec.remote import SCHEMES, FsspecRemote, open_fsspec_remote

__all__ = ["SCHEMES", "FsspecRemote", "open_fsspec_remote"]

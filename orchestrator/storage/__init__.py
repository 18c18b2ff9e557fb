"""Object storage: content-addressed sync between local paths and S3-compatible buckets or
directories. Runs on the laptop and on the instance; imports nothing laptop-only."""

from .cache import TransferCache, hash_file
from .stores import CorruptBlob, StorageError
from .sync import SyncResult, VerifyResult, list_models, make_s3_client, parse_location, pull, push, verify

__all__ = ["TransferCache", "hash_file", "CorruptBlob", "StorageError", "SyncResult", "VerifyResult", "list_models",
           "make_s3_client", "parse_location", "pull", "push", "verify"]

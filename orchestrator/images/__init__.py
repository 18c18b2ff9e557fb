"""Environment images: save an instance's whole environment to the user's bucket, bring it
back on any provider and region, migrate between them.

    manifest.py  ImageMeta: what an image is (versioned schema), checked before use
    store.py     where images live in the bucket; list, read, write, check, remove
    save.py      `orch image save`: packed and pushed by the instance, straight to the bucket
    restore.py   PortableRestore: a bootstrap strategy for `orch up --from-image`
    migrate.py   `orch migrate`: save → up elsewhere → verify → down the old one, with rollback
"""

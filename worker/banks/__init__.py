"""Banks of known-bad image hashes (PDQ), matched before the model runs.

``hashlist`` reads hash-list files and folders of images, ``base`` holds the ``BankStore`` seam
and its in-memory fake, ``redis`` the shared store, ``gate`` the check the pipeline makes. The
hashing itself (PDQ and the multi-index that finds near hashes by exact lookups) is in
``worker.hashing``. docs/banks.md is the operator's guide.
"""

from worker.banks.base import BankInfo, BankMatch, BankStore, MemoryBankStore, check_bank_name
from worker.banks.hashlist import (
    HashedImages,
    HashList,
    SkippedImage,
    hash_images,
    load_hash_list,
    open_image,
    read_hash_list,
)
from worker.banks.redis import RedisBankStore, bank_client
from worker.hashing.pdq import PDQ_MAX_DISTANCE, PDQ_QUALITY_MIN, PdqHash, parse_pdq, pdq_hash

__all__ = [
    "PDQ_MAX_DISTANCE",
    "PDQ_QUALITY_MIN",
    "BankInfo",
    "BankMatch",
    "BankStore",
    "HashList",
    "HashedImages",
    "MemoryBankStore",
    "PdqHash",
    "RedisBankStore",
    "SkippedImage",
    "bank_client",
    "check_bank_name",
    "hash_images",
    "load_hash_list",
    "open_image",
    "parse_pdq",
    "pdq_hash",
    "read_hash_list",
]

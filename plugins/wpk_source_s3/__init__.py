"""WPK source for ``s3://bucket/prefix/`` repositories (entry point ``s3``; extra ``s3``).

The bucket holds the reference repository layout and ``versions`` files, exactly as an HTTP
repository does. boto3 is imported lazily, on the first request: importing this package, and
loading the driver, work without it; a request then fails with an error naming
``pip install 'wpk-upgrade[s3]'``.
"""

from .source import (
    MISSING_BOTO3,
    S3RepositorySource,
    S3SourceConfig,
    S3SourceConfigSchema,
    split_s3_url,
)

__all__ = [
    "MISSING_BOTO3",
    "S3RepositorySource",
    "S3SourceConfig",
    "S3SourceConfigSchema",
    "split_s3_url",
]

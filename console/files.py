"""Reading the archive the archive sink writes (``sinks/archive.py``), on a folder or S3.

A frame is found by what names it, (stream, session, seq): its index row (the folder's
``index.sqlite``, or the per-frame JSON object on S3) gives the keys of its files, and only
those keys are ever read, so nothing a request says becomes a path. On S3 the operators'
reviews are also kept in the bucket (``_console/reviews/<hash>.json``), so a console whose
local SQLite is new finds them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from pathlib import Path

from ..sinks.archive import safe_component

log = logging.getLogger(__name__)

KINDS = {"frame": ("frame_path", "image/jpeg"), "mask": ("mask_path", "image/png"),
         "overlay": ("overlay_path", "image/jpeg")}


def base_key(stream: str, session: str, seq: int) -> str:
    """Where the archive sink puts a frame's files (without the suffix)."""
    folder = f"{safe_component(session)}/" if session else ""
    return f"{safe_component(stream)}/{folder}{seq:010d}"


class ArchiveFiles:
    """``root``: the archive folder or ``s3://bucket/prefix`` (S3 endpoint and keys from the
    standard AWS environment, as for the archive sink)."""

    def __init__(self, root: str):
        self.root = root
        self.s3 = root.startswith("s3://")
        if self.s3:
            import boto3

            bucket, _, prefix = root.removeprefix("s3://").partition("/")
            if not bucket:
                raise ValueError(f"archive URL {root!r}: expected s3://bucket[/prefix]")
            self.bucket, self.prefix = bucket, prefix.strip("/")
            self.client = boto3.client("s3")
        else:
            self.folder = Path(root).expanduser().resolve()

    @property
    def index_path(self) -> Path | None:
        """The folder archive's SQLite index (None on S3)."""
        return None if self.s3 else self.folder / "index.sqlite"

    def row(self, stream: str, session: str, seq: int) -> dict | None:
        """The frame's index row, or None when it was not archived."""
        if self.s3:
            data = self._get(base_key(stream, session, seq) + ".json")
            return json.loads(data) if data is not None else None
        if not self.index_path.is_file():
            return None
        try:
            with sqlite3.connect(f"file:{self.index_path}?mode=ro", uri=True, timeout=10) as db:
                db.row_factory = sqlite3.Row
                found = db.execute("SELECT * FROM frames WHERE stream = ? AND session = ? AND seq = ?",
                                   (stream, session, seq)).fetchone()
        except sqlite3.Error as err:  # no frames table yet, locked for too long, ...
            log.debug("archive index: %s", err)
            return None
        if found is None:
            return None
        row = dict(found)
        row["telemetry"] = json.loads(row["telemetry"]) if row.get("telemetry") else None
        return row

    def image(self, row: dict, kind: str) -> tuple[bytes, str] | None:
        """(bytes, content type) of one of a frame's files: ``frame``, ``mask`` or ``overlay``."""
        column, content_type = KINDS[kind]
        key = row.get(column)
        if not key:
            return None
        data = self._get(key) if self.s3 else self._read_local(key)
        return (data, content_type) if data is not None else None

    def _read_local(self, key: str) -> bytes | None:
        path = (self.folder / key).resolve()
        if not path.is_relative_to(self.folder):  # an index row is ours, but never leave the root
            return None
        try:
            return path.read_bytes()
        except OSError:
            return None

    # ---- S3 ----------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _get(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                log.warning("archive %s: %s", self.root, err)
            return None
        except BotoCoreError as err:
            log.warning("archive %s: %s", self.root, err)
            return None

    def keep_review(self, review: dict) -> None:
        """On S3, the review as an object beside the archive (a folder archive's index holds it)."""
        if not self.s3:
            return
        name = hashlib.sha256(review["event_id"].encode()).hexdigest()[:32]
        self.client.put_object(Bucket=self.bucket, Key=self._key(f"_console/reviews/{name}.json"),
                               Body=json.dumps(review).encode(), ContentType="application/json")

    def kept_reviews(self) -> list[dict]:
        if not self.s3:
            return []
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=self._key("_console/reviews/")):
            for item in page.get("Contents", []):
                data = self._get(item["Key"].removeprefix(f"{self.prefix}/") if self.prefix else item["Key"])
                if data is not None:
                    out.append(json.loads(data))
        return out

"""The reading and writing side of ``kind: batch``: input rows as a Ray Data source keyed by row
number, each replica's results written straight to ``output_dir/parts/`` by a Ray Data sink with
Ray Data's own checkpointing, and the final files assembled from what was written.

- **Input** (:func:`index_input`, :class:`BatchInput`). The driver streams over the input once
  (holding nothing but a list of block starts and a hash): a JSONL block is a byte offset, the
  1-based line and the 0-based row number where it starts; parquet and saved ``datasets`` blocks
  are row ranges. Each Ray Data read task then reads its block on whatever node runs it and
  parses and checks its rows there: a row that cannot be used comes out with ``reason`` set
  (``bad_row``, ``empty_prompt``) and goes to the rejects without reaching an engine.
- **Output** (:class:`PartsSink`): one parquet part per write task (``row``, ``status``,
  ``reason``, ``where``, ``tokens``, ``gold``, ``gen_s``, ``replica``, ``json``), written by the
  worker that holds the rows, to a local path or a URI (pyarrow filesystem of the
  :class:`~rayapp.storage.OutputStore`).
- **Exactly once** (:func:`checkpoint_config`): ``ray.data.checkpoint.CheckpointConfig`` keyed by
  ``row``. Ray Data writes a pending checkpoint (the part's row numbers) before the part, renames it
  committed after, and on a re-run drops every row already committed before it reaches a replica,
  and deletes parts whose checkpoint never got committed (a task killed between the two). Assembly
  reads only parts with a committed checkpoint and checks that every input row is there exactly
  once (:class:`BatchIntegrityError` otherwise).
- **Assembly** (:func:`assemble`, run as a Ray task next to the data): a merge by row number over
  the parts (each sorted; only parts whose ranges overlap are open at once) streams
  ``output.jsonl`` and ``rejects.jsonl`` in input order and sums ``stats.json``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rayapp.data.readers import DataFileError, detect_format, parse_jsonl_line
from rayapp.errors import UserError

PARTS, CHECKPOINT = "parts", "checkpoint"
PART_COLUMNS = ("row", "status", "reason", "where", "tokens", "gold", "gen_s", "replica", "json")
_BOM = b"\xef\xbb\xbf"
_JSON_BLANK = b" \t\r\n"


class BatchIntegrityError(UserError, RuntimeError):
    """What was written does not hold every input row exactly once."""


# -- input ------------------------------------------------------------------------------------

def index_input(path: str, max_rows: int | None, rows_per_block: int) -> dict:
    """{"format", "rows", "sha256", "blocks": [(start_row, end_row, byte_offset, line)]}, in one
    streaming pass (JSONL lines are counted as ``read_rows`` counts them: blank lines are not rows)."""
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"{p}: file not found")
    fmt = detect_format(p)
    h = hashlib.sha256()
    starts: list[tuple[int, int, int]] = []  # (row, byte offset, line)
    if fmt == "jsonl":
        n = offset = 0
        with open(p, "rb") as f:
            for line, raw in enumerate(f, start=1):
                h.update(raw)
                start, offset = offset, offset + len(raw)
                body = raw[len(_BOM):] if line == 1 and raw.startswith(_BOM) else raw
                if not body.strip(_JSON_BLANK):
                    continue
                if max_rows is not None and n >= max_rows:
                    break
                if n % rows_per_block == 0:
                    starts.append((n, start, line))
                n += 1
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        n = _table_rows(p, fmt)
        n = min(n, max_rows) if max_rows is not None else n
        starts = [(r, 0, r + 1) for r in range(0, n, rows_per_block)]
    blocks = [(row, starts[i + 1][0] if i + 1 < len(starts) else n, offset, line) for i, (row, offset, line) in enumerate(starts)]
    return {"format": fmt, "rows": n, "sha256": h.hexdigest()[:16], "blocks": blocks}


def _table_rows(p: Path, fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(p).metadata.num_rows
    return len(_load_datasets(p))


def _load_datasets(p: Path):
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train" if "train" in ds else next(iter(ds))]
    return ds


def block_rows(path: str, fmt: str, start: int, end: int, offset: int, line: int) -> Iterator[tuple[int, str, dict, str | None]]:
    """(row, where, data, error) for rows ``start..end-1`` of the input (as ``read_rows`` gives them)."""
    if fmt == "jsonl":
        n = start
        with open(path, "rb") as f:
            f.seek(offset)
            for i, raw in enumerate(f, start=line):
                if n >= end:
                    return
                if i == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                if not raw.strip(_JSON_BLANK):
                    continue
                data, _, error = parse_jsonl_line(raw)
                yield n, f"{path}:{i}", data, error
                n += 1
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        first = 0
        for g in range(pf.metadata.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            if first + size > start and first < end:
                for k, data in enumerate(pf.read_row_group(g).to_pylist()):
                    if start <= first + k < end:
                        yield first + k, f"{path}:{first + k + 1}", data, None
            first += size
    else:
        ds = _load_datasets(Path(path)).select(range(start, end))
        for k, data in enumerate(ds):
            yield start + k, f"{path}:{start + k + 1}", dict(data), None


def check_row(data: dict, task: str) -> tuple[dict, str | None, str | None]:
    """(the row without nulls, reject reason, detail): the checks ``load_input`` made on the driver."""
    from rayapp.data.formats import RowError, parse_distill_input, parse_prompt, present

    data = present(data)
    try:
        (parse_distill_input if task == "rationales" else parse_prompt)(data)
    except RowError as e:
        reason = "empty_prompt" if e.kind == "empty text" and e.field in ("input_text", "messages") else "bad_row"
        return data, reason, f"{e.field}: {e.reason}"
    return data, None, None


def read_block(path: str, fmt: str, task: str, start: int, end: int, offset: int, line: int):
    """One read task: a pyarrow table of the block's rows (``json`` holds the row; ``reason`` is set
    for a row that goes to the rejects without an engine)."""
    import pyarrow as pa

    cols: dict[str, list] = {"row": [], "where": [], "json": [], "reason": [], "detail": []}
    for row, where, data, error in block_rows(path, fmt, start, end, offset, line):
        reason, detail = ("bad_row", error) if error else (None, None)
        if not error:
            data, reason, detail = check_row(data, task)
        cols["row"].append(row)
        cols["where"].append(where)
        cols["json"].append(json.dumps(data, ensure_ascii=False) if not reason else "")
        cols["reason"].append(reason)
        cols["detail"].append(detail)
    return pa.table({"row": pa.array(cols["row"], pa.int64()), **{k: pa.array(v, pa.string()) for k, v in cols.items() if k != "row"}})


def input_datasource(path: str, index: dict, task: str):
    """A Ray Data ``Datasource`` with one read task per block of ``index`` (a Read operator: what
    Ray Data's checkpoint filter attaches to)."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class BatchInput(Datasource):
        def estimate_inmemory_data_size(self):
            return index["rows"] * 256

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
            tasks = []
            for start, end, offset, line in index["blocks"]:
                def read(start=start, end=end, offset=offset, line=line):
                    yield read_block(path, index["format"], task, start, end, offset, line)

                tasks.append(ReadTask(read, BlockMetadata(num_rows=end - start, size_bytes=(end - start) * 256, input_files=[path], exec_stats=None)))
            return tasks

        def get_name(self) -> str:
            return "BatchInput"

    return BatchInput()


# -- output -----------------------------------------------------------------------------------

def fs_path(store, rel: str) -> str:
    return posixpath.join(store.root, rel)


def checkpoint_config(store):
    """Ray Data checkpointing keyed by the input row number, kept beside the parts (never deleted
    on success: it is what tells a re-run that a row is done)."""
    from ray.data.checkpoint import CheckpointConfig

    return CheckpointConfig(id_column="row", checkpoint_path=store.uri_of(CHECKPOINT), delete_checkpoint_on_success=False,
                            override_filesystem=store.fs)


def parts_sink(store):
    """The Ray Data sink every replica writes its rows through: parquet parts in output_dir/parts."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from ray.data.datasource import BlockBasedFileDatasink

    class PartsSink(BlockBasedFileDatasink):
        rows_written = 0

        def __init__(self):
            super().__init__(fs_path(store, PARTS), filesystem=store.fs, file_format="parquet")

        def write_block_to_file(self, block, file) -> None:
            table = block.to_arrow()
            pq.write_table(table.take(pc.sort_indices(table["row"])), file)

        def on_write_complete(self, write_result) -> None:
            super().on_write_complete(write_result)
            self.rows_written = write_result.num_rows

    return PartsSink()


def _names(store, rel: str, suffix: str) -> dict[str, str]:
    """{base name: fs path} of the files directly under ``rel`` ending in ``suffix``."""
    import pyarrow.fs as pafs

    info = store.fs.get_file_info(pafs.FileSelector(fs_path(store, rel), allow_not_found=True))
    return {posixpath.basename(i.path)[: -len(suffix)]: i.path for i in info if i.type == pafs.FileType.File and i.path.endswith(suffix)}


def committed(store) -> dict[str, str]:
    """Committed checkpoints: {part base name: checkpoint path}."""
    return {k: v for k, v in _names(store, CHECKPOINT, ".parquet").items() if not k.endswith(".pending")}


def done_rows(store) -> int:
    """Input rows whose results are written and committed (what a re-run skips)."""
    import pyarrow.parquet as pq

    total = 0
    for path in committed(store).values():
        with store.fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


@contextmanager
def _output(store, rel: str):
    """A binary stream to ``rel`` in output_dir that appears whole or not at all."""
    if store.remote:  # an object appears only when its upload completes
        with store.fs.open_output_stream(fs_path(store, rel)) as f:
            yield f
        return
    final = Path(store.root) / rel
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _part_rows(store, path: str, columns: list[str]):
    """Tuples of ``columns`` of one part, in row order (``row`` first), a batch at a time."""
    import pyarrow.parquet as pq

    with store.fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=512, columns=columns):
            yield from zip(*(batch.column(i).to_pylist() for i in range(batch.num_columns)), strict=True)


def _merged(store, parts: dict[str, str], columns: list[str]) -> Iterator[tuple]:
    """Every part's rows, merged by row number; a part is opened when the merge reaches its first
    row, so only parts whose row ranges overlap are open at the same time."""
    import pyarrow.parquet as pq

    firsts = []
    for path in parts.values():
        with store.fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        stats = meta.row_group(0).column(0).statistics if meta.num_row_groups else None
        firsts.append((stats.min if stats is not None and stats.has_min_max else -1, path))
    firsts.sort()
    heap: list = []
    k = 0
    while k < len(firsts) or heap:
        while k < len(firsts) and (not heap or firsts[k][0] <= heap[0][0]):
            it = _part_rows(store, firsts[k][1], columns)
            first = next(it, None)
            if first is not None:
                heapq.heappush(heap, (first[0], k, first, it))
            k += 1
        if not heap:
            continue
        _, i, row, it = heapq.heappop(heap)
        yield row
        nxt = next(it, None)
        if nxt is not None:
            heapq.heappush(heap, (nxt[0], i, nxt, it))


def committed_parts(store) -> dict[str, str]:
    """{name: path} of the parts whose checkpoint is committed (a part without one is left out:
    Ray Data deletes such a part on the next run)."""
    done = committed(store)
    return {name: path for name, path in _names(store, PARTS, ".parquet").items() if name in done}


def check_exactly_once(store, parts: dict[str, str], num_rows: int) -> None:
    """Raise BatchIntegrityError unless the parts hold rows 0..num_rows-1 exactly once."""
    expected, seen, duplicates, missing = 0, 0, [], []
    for (row,) in _merged(store, parts, ["row"]):
        if row < expected:
            duplicates.append(row)
            continue
        missing.extend(range(expected, min(row, expected + 10)) if len(missing) < 10 else ())
        expected, seen = row + 1, seen + 1
    missing.extend(range(expected, min(num_rows, expected + 10)))
    if duplicates or missing or seen != num_rows:
        raise BatchIntegrityError(
            f"{store.uri_of(PARTS)}: the committed parts hold {seen} of {num_rows} input rows (duplicated rows "
            f"{duplicates[:10]}, missing rows {missing[:10]}); re-run the job to finish it, or delete "
            f"{store.uri_of(PARTS)} and {store.uri_of(CHECKPOINT)} to start over"
        )


def assemble(store, num_rows: int) -> dict:
    """output.jsonl, rejects.jsonl (input order) and stats.json from the committed parts, once they
    hold every input row exactly once (:func:`check_exactly_once` first: nothing is written otherwise)."""
    parts = committed_parts(store)
    check_exactly_once(store, parts, num_rows)
    stats: dict = {"rows_in": 0, "written": 0, "tokens": 0, "gold_checked": 0, "gold_agree": 0, "generate_s": 0.0}
    columns = ["row", "status", "reason", "tokens", "gold", "gen_s", "json"]
    with _output(store, "output.jsonl") as out, _output(store, "rejects.jsonl") as rej:
        for _, status, reason, tokens, gold, gen_s, text in _merged(store, parts, columns):
            stats["rows_in"] += 1
            stats["generate_s"] += gen_s or 0.0
            if status == "ok":
                stats["written"] += 1
                stats["tokens"] += tokens or 0
                out.write(text.encode("utf-8") + b"\n")
            else:
                stats[reason] = stats.get(reason, 0) + 1
                rej.write(text.encode("utf-8") + b"\n")
            if gold is not None and gold >= 0:  # checked against a gold label (kept, or dropped as gold_mismatch)
                stats["gold_checked"] += 1
                stats["gold_agree"] += gold
    stats["generate_s"] = round(stats["generate_s"], 1)
    stats["parts"] = len(parts)
    with _output(store, "stats.json") as f:
        f.write(json.dumps(stats, indent=1).encode())
    return stats

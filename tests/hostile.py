"""Hostile inputs for the reliability tests: row values (hypothesis strategies), whole pools and configs.

A pool case is a directory of files plus what a correct run must do with it: either finish with a
complete output whose every (file, row) appears once with the `error` we expect (or none), or stop
before compute with a given error class whose message names the file, column or key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import strategies as st

from igds_ray import schema as S
from igds_ray.errors import PoolError

# ---------------------------------------------------------------------------------------------
# row values

NORMAL = ("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7 #### 7", "the cat sells a stone")
UNICODE = (
    "😀🔥👩‍👩‍👧‍👦 emoji",
    "مرحبا بالعالم",  # RTL
    "\u202eevil\u202c override",  # RTL override
    "שלום עולם",
    "\x00\x01\x07\x1b[31m control",
    "\u200b\u200b",  # zero-width spaces only: not whitespace to str.strip
    "\ufeffBOM",
    "e\u0301" * 50,  # combining marks
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<s></s><unk>",  # the tokenizer's own special-token strings as text
    "\r\n\t",
)
WHITESPACE = ("", " ", "\n", "\t \r\n", "\u00a0", "\u3000\u2003")


def text_values() -> st.SearchStrategy[str | None]:
    """A text cell: None, empty, whitespace, normal, huge, integers as strings, any unicode."""
    return st.one_of(
        st.none(),
        st.sampled_from(WHITESPACE),
        st.sampled_from(NORMAL),
        st.sampled_from(UNICODE),
        st.integers(-(10**30), 10**30).map(str),
        st.integers(200, 40_000).map(lambda n: "apple " * n),  # huge: capped before tokenizing
        st.text(max_size=40),  # any code point hypothesis likes (control chars included)
    )


def byte_values() -> st.SearchStrategy[bytes | None]:
    """A binary cell: valid UTF-8, invalid UTF-8 (lone continuation bytes, truncated sequences), None."""
    return st.one_of(
        st.none(),
        st.sampled_from(NORMAL).map(str.encode),
        st.sampled_from([b"\xff\xfe", b"abc\x80", b"\xe2\x82", b"\xc0\xaf", b"ok \xed\xa0\x80 surrogate"]),
        st.binary(max_size=24),
    )


@st.composite
def reader_tables(draw: st.DrawFn, text_columns: tuple[str, ...] = ("prompt", "response"), max_rows: int = 10):
    """(table as the pool reader hands it to a scorer, per-row input error or None).

    Each column is, per example, one of: strings, binary (maybe invalid UTF-8), integers (not text).
    """
    from igds_ray.pool import as_text

    n = draw(st.integers(0, max_rows))
    cols: dict[str, Any] = {
        S.ID: pa.array([f"r{i}" for i in range(n)], pa.string()),
        S.SRC_FILE: pa.array(["f.parquet"] * n, pa.string()),
        S.SRC_ROW: pa.array(range(n), pa.int64()),
    }
    errors: list[str | None] = [None] * n
    for c in text_columns:
        kind = draw(st.sampled_from(["string", "string", "string", "binary", "int"]))
        if kind == "string":
            raw = pa.array(draw(st.lists(text_values(), min_size=n, max_size=n)), pa.string())
        elif kind == "binary":
            raw = pa.array(draw(st.lists(byte_values(), min_size=n, max_size=n)), pa.binary())
        else:
            raw = pa.array(draw(st.lists(st.integers(-5, 5) | st.none(), min_size=n, max_size=n)), pa.int64())
        vals, errs = as_text(pa.chunked_array([raw], raw.type), c)
        cols[c] = pa.array(vals, pa.large_string())
        errors = [a or b for a, b in zip(errors, errs)]
    cols[S.INPUT_ERROR] = pa.array(errors, pa.string())
    return pa.table(cols), errors


# ---------------------------------------------------------------------------------------------
# whole pools


@dataclass
class PoolCase:
    """Files of a hostile pool and what a correct run does with it.

    `files`: relative path -> Arrow table or raw bytes. `expect`: "complete", or an error class
    raised before compute. `match`: regex the error message must match (names file/column/key).
    `row_errors`: counted file -> per-row expected error (a regex, or None = must be scored);
    files absent from it must not appear in the output at all.
    """

    name: str
    files: dict[str, pa.Table | bytes]
    expect: str | type[Exception] = "complete"
    match: str = ""
    row_errors: dict[str, list[str | None]] = field(default_factory=dict)
    write_options: dict[str, dict] = field(default_factory=dict)  # per file: pq.write_table kwargs
    id_column: str = "id"

    def write(self, root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        for rel, content in self.files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                pq.write_table(content, p, **self.write_options.get(rel, {}))
        return root


def _pr(prompts: list, responses: list | None = None, ptype: pa.DataType = pa.string(),
        rtype: pa.DataType = pa.string(), **extra: Any) -> pa.Table:
    responses = responses if responses is not None else ["fine answer"] * len(prompts)
    return pa.table({"prompt": pa.array(prompts, ptype), "response": pa.array(responses, rtype), **extra})


def _good(n: int = 3, tag: str = "") -> pa.Table:
    return _pr([f"Tom has {i} apples{tag}." for i in range(n)])


def parquet_bytes(table: pa.Table, **kw: Any) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, **kw)
    return buf.getvalue().to_pybytes()


def corrupt_data_page() -> bytes:
    """A Parquet file with a valid footer (it passes discovery) whose first data page is garbage."""
    b = bytearray(parquet_bytes(_pr([f"Tom has {i} apples" for i in range(500)]), compression="snappy"))
    b[100:400] = b"\xab" * 300
    return bytes(b)


HUGE = "seven " * 1_000_000  # 6 MB in one cell
ANY = "<any>"  # either scored or an error: the tokenizer decides


def mixed_pool() -> PoolCase:
    """Every row-level hostility in one pool with generated ids (one Ray job scores it all)."""
    texts = [None, "", "   \n\t", "Tom has 3 apples.", HUGE, "😀 مرحبا \u202e", "\x00\x07", "12345", "\u200b"]
    empty_ws = "prompt is empty or whitespace only"
    # `\x00\x07` and `\u200b` are not whitespace to str.strip: the tokenizer decides (ANY).
    text_errs = ["prompt is null", empty_ws, empty_ws, None, None, None, ANY, None, ANY]
    binary = [b"Tom has 3 apples.", b"\xff\xfe bad", None, b"caf\xc3\xa9 ok", b"abc\xe2\x82"]
    bin_errs = [None, "prompt is not valid UTF-8", "prompt is null", None, "prompt is not valid UTF-8"]
    many_rg = _pr([f"row {i} has more apples" if i % 7 else None for i in range(50)])
    extra = _good(4).append_column("score", pa.array([1.0] * 4)).append_column(
        "error", pa.array(["fake"] * 4)).append_column(S.INPUT_ERROR, pa.array(["fake"] * 4)).append_column(
        "src_row", pa.array([99] * 4)).append_column("nested", pa.array([{"a": [1, 2]}] * 4))
    files: dict[str, pa.Table | bytes] = {
        "texts.parquet": _pr(texts),
        "responses.parquet": _pr(["Tom has 3 apples."] * 4, [None, "", "ok", HUGE]),
        "binary.parquet": _pr(binary, [b"fine"] * 5, ptype=pa.binary(), rtype=pa.binary()),
        "nonstring.parquet": pa.table({"prompt": pa.array([1, 2, None], pa.int64()), "response": ["a", "b", "c"]}),
        "floats.parquet": pa.table({"prompt": pa.array([1.5, float("nan")]), "response": ["a", "b"]}),
        "nested.parquet": pa.table({"prompt": pa.array([["a"], []]), "response": ["a", "b"]}),
        "large.parquet": _pr(["Tom has 1 apple.", None], ptype=pa.large_string(), rtype=pa.large_string()),
        # pandas `category` columns arrive dictionary-encoded: still text.
        "category.parquet": pa.table({"prompt": pa.array(["Tom has 3 apples.", None, "Tom has 3 apples."]
                                                         ).dictionary_encode(), "response": ["a", "b", "c"]}),
        "extra_columns.parquet": extra,
        "empty.parquet": _pr([], []),
        "many_row_groups.parquet": many_rg,
        "sub/dir/nested_file.parquet": _good(2, " nested"),
        # Not part of the pool: hidden or not Parquet.
        "_hidden.parquet": _good(5),
        ".dot.parquet": _good(5),
        "_attempt-x/part.parquet": _good(5),
        "notes.txt": b"not a pool file",
        "data.parquet.crc": b"\x00\x01",
    }
    row_errors = {
        "texts.parquet": text_errs,
        # `last` pooling (the default) does not read the response: an empty one is allowed, but the
        # reader flags a null one whatever the pooling.
        "responses.parquet": ["response is null", None, None, None],
        "binary.parquet": bin_errs,
        "nonstring.parquet": ["prompt has type int64, not a string"] * 3,
        "floats.parquet": ["prompt has type double, not a string"] * 2,
        "nested.parquet": ["prompt has type list"] * 2,
        "large.parquet": [None, "prompt is null"],
        "category.parquet": [None, "prompt is null", None],
        "extra_columns.parquet": [None] * 4,
        "empty.parquet": [],
        "many_row_groups.parquet": [None if i % 7 else "prompt is null" for i in range(50)],
        "sub/dir/nested_file.parquet": [None] * 2,
    }
    return PoolCase("mixed", files, row_errors=row_errors,
                    write_options={"many_row_groups.parquet": {"row_group_size": 3}})



def duplicate_ids_pool() -> PoolCase:
    """Integer ids, repeated within and across files (identical rows and different rows)."""
    a = _pr(["Tom has 3 apples.", "Tom has 3 apples.", "A cat and a dog.", "Rain in the north."],
            id=pa.array([7, 7, 8, 9], pa.int64()))
    b = _pr(["Tom has 3 apples.", "The city is warm."], id=pa.array([7, 9], pa.int64()))
    return PoolCase("duplicate_ids", {"a.parquet": a, "b.parquet": b},
                    row_errors={"a.parquet": [None] * 4, "b.parquet": [None] * 2})


def error_pools() -> list[PoolCase]:
    """Pools a run must refuse before compute, naming the file/column."""
    good = _good(3)
    return [
        PoolCase("missing_column", {"a.parquet": good, "b.parquet": pa.table({"prompt": ["x"]})},
                 PoolError, r"b\.parquet: missing column 'response'"),
        PoolCase("corrupt_file", {"a.parquet": good, "b.parquet": b"PAR1 garbage PAR1"},
                 PoolError, r"b\.parquet: not a readable Parquet file"),
        PoolCase("truncated_file", {"a.parquet": good, "b.parquet": parquet_bytes(_good(50))[:300]},
                 PoolError, r"b\.parquet: not a readable Parquet file"),
        PoolCase("zero_byte_file", {"a.parquet": good, "b.parquet": b""},
                 PoolError, r"b\.parquet: not a readable Parquet file"),
        PoolCase("no_parquet_files", {"notes.txt": b"x", "_hidden.parquet": good},
                 PoolError, r"no Parquet files"),
        PoolCase("ids_in_some_files", {"a.parquet": good, "b.parquet": _good(2).append_column("id", pa.array([1, 2]))},
                 PoolError, r"b\.parquet: column 'id' is present here but absent in a\.parquet"),
        PoolCase("id_types_differ", {"a.parquet": good.append_column("id", pa.array([1, 2, 3])),
                                     "b.parquet": good.append_column("id", pa.array(["x", "y", "z"]))},
                 PoolError, r"b\.parquet: id column 'id' has type string"),
        PoolCase("float_ids", {"a.parquet": good.append_column("id", pa.array([1.0, 2.0, 3.0]))},
                 PoolError, r"a\.parquet: id column 'id' must be integers or strings"),
        PoolCase("null_ids", {"a.parquet": good.append_column("id", pa.array(["x", None, "z"]))},
                 PoolError, r"a\.parquet: id column 'id' has null values"),
        # Null ids in a file written without column statistics: the footer cannot tell.
        PoolCase("null_ids_no_statistics", {"a.parquet": good.append_column("id", pa.array(["x", "y", "z"])),
                                            "b.parquet": good.append_column("id", pa.array(["u", None, "w"]))},
                 PoolError, r"b\.parquet: id column 'id' has null values",
                 write_options={"a.parquet": {"write_statistics": False}, "b.parquet": {"write_statistics": False}}),
        PoolCase("duplicate_column_names", {"a.parquet": pa.Table.from_arrays(
            [pa.array(["Tom has 3 apples."]), pa.array(["other"]), pa.array(["4"])],
            names=["prompt", "prompt", "response"])}, PoolError, r"a\.parquet: column 'prompt' appears 2 times"),
        PoolCase("only_empty_files", {"a.parquet": _pr([], []), "b.parquet": _pr([], [])},
                 PoolError, r"hold no rows"),
    ]


def one_token_pool(root: Path, word: str, n: int = 100_000, n_files: int = 4) -> Path:
    """`n` rows whose prompt is a single token, in `n_files` files of several row groups each."""
    root.mkdir(parents=True, exist_ok=True)
    per = n // n_files
    for f in range(n_files):
        pq.write_table(pa.table({"prompt": [word] * per, "response": [word] * per}), root / f"p{f}.parquet",
                       row_group_size=10_000)
    return root

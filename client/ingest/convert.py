"""Vectorised conversions of raw columns (text or typed) to store types, with a mask of failures.

Each converter first tries one whole-array pyarrow cast, which is what a clean export needs; only when
that raises does it work out, still vectorised, which values are bad. Failed values come back as null
(or 0 for epoch milliseconds) with `bad` set, never as an exception.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MS_TYPE = pa.timestamp("ms", tz="UTC")
_ISO = (
    r"^(?P<date>\d{4}-\d{2}-\d{2})(?:[T ](?P<time>\d{2}:\d{2}(?::\d{2})?)(?P<frac>[.,]\d{1,9})?)?"
    r"\s*(?P<tz>[Zz]|[+-]\d{2}(?::?\d{2})?)?$"
)
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def to_numpy_bool(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean pyarrow mask as numpy, null counting as False."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _none_bad(n: int) -> np.ndarray:
    return np.zeros(n, bool)


def _utf8_or_null(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Binary to string; values that are not UTF-8 become null and are flagged."""
    try:
        return pc.cast(arr, pa.string()), _none_bad(len(arr))
    except pa.ArrowInvalid:
        pass
    bad = np.zeros(len(arr), bool)
    values: list[str | None] = []
    for i, raw in enumerate(arr.to_pylist()):  # rare: only batches holding invalid bytes come here
        try:
            values.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(None)
            bad[i] = True
    return pa.array(values, pa.string()), bad


def as_text(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Any scalar column as non-empty strings (empty -> null); `bad`: not UTF-8, or not a scalar."""
    t = arr.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        out, bad = _utf8_or_null(arr)
    elif pa.types.is_null(t):
        out, bad = pa.nulls(len(arr), pa.string()), _none_bad(len(arr))
    elif pa.types.is_nested(t):
        out, bad = pa.nulls(len(arr), pa.string()), to_numpy_bool(pc.is_valid(arr))
    else:
        out, bad = pc.cast(arr, pa.string()), _none_bad(len(arr))
    lengths = pc.binary_length(out)
    if out.null_count < len(out) and pc.min(lengths).as_py() == 0:
        out = pc.if_else(pc.equal(lengths, 0), pa.scalar(None, pa.string()), out)
    return out, bad


def _text_ints(s: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Decimal integer strings as int64; anything else (empty included) is bad."""
    try:
        ints = pc.cast(s, pa.int64())
        if not ints.null_count:
            return ints.to_numpy(), np.zeros(len(s), bool)
        return pc.fill_null(ints, 0).to_numpy(), to_numpy_bool(pc.is_null(ints))
    except pa.ArrowInvalid:
        pass
    ok = pc.and_(pc.ascii_is_decimal(s), pc.less_equal(pc.binary_length(s), 18))
    safe = pc.if_else(ok, s, pa.scalar("0"))
    return pc.fill_null(pc.cast(safe, pa.int64()), 0).to_numpy(), ~to_numpy_bool(ok)


def _text_floats(s: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Decimal number strings as float64 (nan for bad ones); non-finite values are bad too."""
    try:
        values = pc.cast(s, pa.float64())
    except pa.ArrowInvalid:
        ok = pc.match_substring_regex(s, _NUMBER)
        try:
            values = pc.if_else(ok, pc.cast(pc.if_else(ok, s, pa.scalar("0")), pa.float64()), None)
        except pa.ArrowInvalid:  # the pattern let through something pyarrow rejects: go value by value
            values = pa.array([_float_or_none(v) for v in s.to_pylist()], pa.float64())
    out = np.asarray(pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)
    return out, ~np.isfinite(out)


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


_UNIT_SCALE = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}


def epoch_to_ms(values: np.ndarray, unit: str) -> np.ndarray:
    """Epoch numbers in `unit` (s, ms, us, ns, or auto: by magnitude) as int64 milliseconds."""
    if values.dtype.kind == "f":
        values = np.nan_to_num(values)
        mult, div = _auto_scale(np.abs(values)) if unit == "auto" else _UNIT_SCALE[unit]
        return np.floor(np.clip(values * mult / div, -(2.0**62), 2.0**62)).astype(np.int64)
    ints = values.astype(np.int64, copy=False)
    # Integer arithmetic keeps milliseconds exact; a value so large that x1000 would overflow is out of
    # range either way, so it is clipped first.
    if unit == "auto":
        mult, div = _auto_scale(np.abs(ints))
        return np.where(mult > 1, np.clip(ints, -(2**52), 2**52), ints) * mult // div
    m, d = _UNIT_SCALE[unit]
    if m > 1:
        out = np.clip(ints, -(2**52), 2**52)
        out *= m
        return out
    return ints // d if d > 1 else ints


def _auto_scale(mag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multiplier and divisor to ms by magnitude: a plausible event time is ~1e9 s, ~1e12 ms, ~1e15 us
    or ~1e18 ns, and the ranges do not overlap."""
    mult = np.where(mag < 1e11, 1000, 1)
    div = np.select([mag < 1e14, mag < 1e17], [1, 1000], 1_000_000)
    return mult, div


def _iso_ms(s: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """ISO 8601 strings (date, optional time, fraction and offset; no offset = UTC) as epoch ms."""
    for target in (MS_TYPE, pa.timestamp("ms")):  # whole-array fast paths: zoned, then naive
        try:
            ts = pc.cast(s, target)
            return pc.fill_null(ts.cast(pa.int64()), 0).to_numpy(), to_numpy_bool(pc.is_null(ts))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    parts = pc.extract_regex(s, _ISO)
    date, time, frac, tz = (pc.struct_field(parts, k) for k in ("date", "time", "frac", "tz"))
    time = pc.if_else(pc.equal(pc.binary_length(time), 5), pc.binary_join_element_wise(time, ":00", ""), time)
    time = pc.if_else(pc.equal(pc.binary_length(time), 0), pa.scalar("00:00:00"), time)
    secs = pc.strptime(
        pc.binary_join_element_wise(date, time, " "), format="%Y-%m-%d %H:%M:%S", unit="s", error_is_null=True
    )
    # strptime rolls 2014-02-30 over to March 2: a date that does not survive the round trip is bad
    same_date = pc.equal(pc.strftime(secs, format="%Y-%m-%d"), date)
    bad = ~to_numpy_bool(same_date)
    ms = pc.fill_null(secs.cast(pa.int64()), 0).to_numpy() * 1000
    digits = pc.utf8_rpad(pc.utf8_slice_codeunits(pc.fill_null(frac, ""), 1, 4), 3, "0")
    ms = ms + pc.cast(digits, pa.int64()).to_numpy()
    return ms - _offset_ms(pc.fill_null(tz, "")), bad


def _offset_ms(tz: pa.Array) -> np.ndarray:
    """UTC offsets like Z, +02, +0200, -05:30 in milliseconds (empty and Z: 0)."""
    bare = pc.replace_substring(tz, ":", "")
    zulu = pc.or_(pc.equal(bare, "Z"), pc.equal(bare, "z"))
    bare = pc.if_else(pc.or_(zulu, pc.equal(bare, "")), pa.scalar("+0000"), bare)
    bare = pc.utf8_rpad(bare, 5, "0")
    hours = pc.cast(pc.utf8_slice_codeunits(bare, 1, 3), pa.int64()).to_numpy()
    minutes = pc.cast(pc.utf8_slice_codeunits(bare, 3, 5), pa.int64()).to_numpy()
    sign = np.where(to_numpy_bool(pc.starts_with(bare, "-")), -1, 1)
    return sign * (hours * 60 + minutes) * 60_000


def _text_epoch_ms(s: pa.Array, unit: str) -> tuple[np.ndarray, np.ndarray]:
    if unit == "iso":
        return _iso_ms(s)
    if unit != "auto":
        ints, bad = _text_ints(s)
        return epoch_to_ms(ints, unit), bad
    try:  # the common cases first, each a single cast: integer epochs, then ISO strings
        ints = pc.cast(s, pa.int64())
        return epoch_to_ms(pc.fill_null(ints, 0).to_numpy(), "auto"), to_numpy_bool(pc.is_null(ints))
    except pa.ArrowInvalid:
        pass
    numeric = to_numpy_bool(pc.match_substring_regex(s, _NUMBER))
    if not numeric.any():
        return _iso_ms(s)
    floats, bad_num = _text_floats(s)
    iso, bad_iso = _iso_ms(s)
    ms = np.where(numeric, epoch_to_ms(np.nan_to_num(floats), "auto"), iso)
    return ms, np.where(numeric, bad_num, bad_iso)


def as_epoch_ms(arr: pa.Array, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Any timestamp-like column as int64 epoch milliseconds; `bad`: missing or unparseable."""
    t = arr.type
    if pa.types.is_timestamp(t):
        ints = pc.cast(arr, pa.int64())
        return epoch_to_ms(pc.fill_null(ints, 0).to_numpy(), t.unit), to_numpy_bool(pc.is_null(arr))
    if pa.types.is_date(t):
        ms = pc.cast(pc.cast(arr, pa.date64()), pa.int64())
        return pc.fill_null(ms, 0).to_numpy(), to_numpy_bool(pc.is_null(arr))
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        values = pc.cast(arr, pa.float64() if not pa.types.is_integer(t) else pa.int64())
        out = pc.fill_null(values, 0).to_numpy(zero_copy_only=False)
        bad = to_numpy_bool(pc.is_null(values)) | (~np.isfinite(out) if out.dtype.kind == "f" else False)
        return epoch_to_ms(np.nan_to_num(out), unit if unit in ("s", "ms") else "auto"), bad
    if unit in _UNIT_SCALE and (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        fast = _binary_epoch_ms(arr, unit)
        if fast is not None:
            return fast
    text, bad_text = as_text(arr)
    ms, bad = _text_epoch_ms(text, unit)
    return ms, bad | bad_text | to_numpy_bool(pc.is_null(text))


def _binary_epoch_ms(arr: pa.Array, unit: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A clean column of integer epochs straight from its bytes (None: some value is not an integer,
    so the general path must say which). An integer's bytes are ASCII digits, so the UTF-8 check that
    the general path makes first cannot fail for a column this cast accepts."""
    as_str = pa.large_string() if pa.types.is_large_binary(arr.type) else pa.string()
    try:
        ints = pc.cast(arr.view(as_str), pa.int64())
    except pa.ArrowInvalid:
        return None
    if ints.null_count:  # missing values: bad, as on the general path
        bad = to_numpy_bool(pc.is_null(ints))
        return epoch_to_ms(pc.fill_null(ints, 0).to_numpy(), unit), bad
    return epoch_to_ms(ints.to_numpy(), unit), np.zeros(len(arr), bool)


def as_price(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Any numeric-like column as float64 (null stays null); `bad`: present but not a finite number."""
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        values = pc.cast(arr, pa.float64())
        out = np.asarray(pc.fill_null(values, 0.0).to_numpy(zero_copy_only=False), dtype=np.float64)
        return values, ~np.isfinite(out)
    text, bad_text = as_text(arr)
    present = to_numpy_bool(pc.is_valid(text))
    if not present.any():
        return pa.nulls(len(arr), pa.float64()), bad_text
    floats, bad = _text_floats(text)
    bad = (bad & present) | bad_text
    return pa.array(floats, pa.float64(), mask=bad | ~present), bad

"""Generate the damaged torch-format checkpoints of this folder from ``base.pt``.

    python tests/torch_corpus/generate.py OUT_DIR          # write the damaged files there
    python tests/torch_corpus/generate.py OUT_DIR --table  # ... and re-record EXPECTED.tsv

``base.pt`` is a small modelopt checkpoint written by ``torch.save`` (kept in the
repository: torch writes a random serialization id, so it is not regenerated).  The
damaged files are not kept: they are a pure function of ``base.pt`` and this script
(the tests write them to a temporary folder).  Each is ``base.pt`` damaged one way,
systematically: truncated at many points,
one byte flipped in each field of the zip records (local headers, central directory,
end records), in the pickle and in the tensor data, ranges zeroed, records swapped.

EXPECTED.tsv says, per file, what loading it does and what ``python -m modelopt_c
verify`` says; tests/test_files_and_errors.py checks both against the code and
that these files are exactly what this script writes.  Outcomes:

  CheckpointError   restore / load_modelopt_state raise CheckpointError naming the file
  UnpicklingError   refused by weights_only (the damage made a global or an opcode
                    that torch does not allow), our message, naming the file
  loads             loads and equals base.pt (the damage hit bytes nobody reads)
  loads-different   loads, but a tensor's bytes differ: torch does not check the zip
                    CRCs when it loads (mmap); ``verify`` does, and exits 1
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = HERE / "base.pt"
TABLE = HERE / "EXPECTED.tsv"


def make_base(path: Path) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    state = {
        "modelopt_state_dict": [
            ("quantize", {"config": {"num_bits": 8, "axis": None}, "metadata": {"amax": torch.tensor([1.5, 2.0])}}),
        ],
        "modelopt_version": "0.1.0",
    }
    weights = {
        "w0": torch.randn(4, 4, generator=g),
        "w1": torch.randn(4, 4, generator=g),
        "steps": torch.tensor(7, dtype=torch.int64),
    }
    torch.save({"modelopt_state": state, "model_state_dict": weights}, path)


# ---- the zip layout -------------------------------------------------------------------


def records(data: bytes) -> tuple[list[dict], int]:
    """The central directory's entries (name, offsets of both headers, data span) and
    the offset of the end-of-central-directory record."""
    eocd = data.rindex(b"PK\x05\x06")
    count, cd_size, cd_off = struct.unpack_from("<HII", data, eocd + 10)
    if cd_off == 0xFFFFFFFF or count == 0xFFFF:  # zip64: the locator precedes the eocd
        loc = data.rindex(b"PK\x06\x07", 0, eocd)
        (z64,) = struct.unpack_from("<Q", data, loc + 8)
        count, cd_size, cd_off = struct.unpack_from("<QQQ", data, z64 + 32)
    out, pos = [], cd_off
    for _ in range(count):
        assert data[pos:pos + 4] == b"PK\x01\x02"
        csize, usize, nlen, xlen, clen = struct.unpack_from("<IIHHH", data, pos + 20)
        (local,) = struct.unpack_from("<I", data, pos + 42)
        name = data[pos + 46:pos + 46 + nlen].decode()
        lnlen, lxlen = struct.unpack_from("<HH", data, local + 26)
        start = local + 30 + lnlen + lxlen
        out.append({"name": name, "central": pos, "local": local, "data": start, "size": csize})
        pos += 46 + nlen + xlen + clen
    return out, eocd


def short(name: str) -> str:
    return name.split("/", 1)[-1].replace("/", "_").replace(".", "")


# field offsets (name, offset) inside each kind of record
LOCAL_FIELDS = [("sig", 0), ("version", 4), ("flags", 6), ("method", 8), ("crc", 14), ("csize", 18),
                ("usize", 22), ("namelen", 26), ("extralen", 28), ("name", 30)]
CENTRAL_FIELDS = [("sig", 0), ("flags", 8), ("method", 10), ("crc", 16), ("csize", 20), ("usize", 24),
                  ("namelen", 28), ("extralen", 30), ("commentlen", 32), ("localoff", 42), ("name", 46)]
EOCD_FIELDS = [("sig", 0), ("disk", 4), ("count_disk", 8), ("count", 10), ("cdsize", 12), ("cdoff", 16),
               ("commentlen", 20)]


def cases(data: bytes) -> dict[str, bytes]:
    recs, eocd = records(data)
    by_name = {short(r["name"]): r for r in recs}
    n = len(data)
    out: dict[str, bytes] = {}

    def flip(pos: int, mask: int = 0xFF) -> bytes:
        b = bytearray(data)
        b[pos] ^= mask
        return bytes(b)

    # truncations: evenly spread, plus at every record boundary and inside the end records
    points = {n * k // 24 for k in range(24)} | {n - 1, n - 2, eocd, eocd + 11, eocd - 1}
    for r in recs:
        points |= {r["local"], r["local"] + 15, r["data"], r["data"] + max(1, r["size"] // 2), r["central"]}
    for p in sorted(points):
        out[f"trunc_{p:05d}"] = data[:p]

    # one field of the local header / central directory entry of the important records
    for key in ("datapkl", "data_0", "version", "byteorder"):
        r = by_name.get(key)
        if r is None:
            continue
        for field, off in LOCAL_FIELDS:
            out[f"flip_local_{key}_{field}"] = flip(r["local"] + off)
        for field, off in CENTRAL_FIELDS:
            out[f"flip_central_{key}_{field}"] = flip(r["central"] + off)
    for field, off in EOCD_FIELDS:
        out[f"flip_eocd_{field}"] = flip(eocd + off)

    # the pickle: every 8th byte, a flipped byte and a flipped bit in turn
    pkl = by_name["datapkl"]
    for i in range(0, pkl["size"], 8):
        mask = 0xFF if i % 16 == 0 else 0x01
        out[f"flip_pickle_{i:04d}_{mask:02x}"] = flip(pkl["data"] + i, mask)

    # the data records: first, middle and last byte of each tensor
    for r in recs:
        if r["name"].split("/")[-2:-1] == ["data"]:
            for where, off in (("first", 0), ("mid", r["size"] // 2), ("last", r["size"] - 1)):
                out[f"flip_{short(r['name'])}_{where}"] = flip(r["data"] + off, 0x10)
    sid = by_name.get("data_serialization_id")
    if sid is not None:
        out["flip_serialization_id"] = flip(sid["data"], 0x01)

    # zeroed ranges
    for label, start, size in (("head", 0, 64), ("pickle", pkl["data"], 32), ("middle", n // 2, 256),
                               ("central", recs[0]["central"], 64), ("tail", n - 64, 64)):
        b = bytearray(data)
        b[start:start + size] = bytes(min(size, n - start))
        out[f"zero_{label}"] = bytes(b)

    # swapped records: two same-size tensors' bytes; two central entries' local offsets;
    # the pickle's local header pointed at a tensor
    tensors = [r for r in recs if r["name"].split("/")[-2:-1] == ["data"] and r is not sid]
    same = [(a, b) for a in tensors for b in tensors if a is not b and a["size"] == b["size"]]
    if same:
        a, b = same[0]
        buf = bytearray(data)
        buf[a["data"]:a["data"] + a["size"]], buf[b["data"]:b["data"] + b["size"]] = (
            data[b["data"]:b["data"] + b["size"]], data[a["data"]:a["data"] + a["size"]])
        out["swap_tensor_bytes"] = bytes(buf)
        buf = bytearray(data)
        struct.pack_into("<I", buf, a["central"] + 42, b["local"])
        struct.pack_into("<I", buf, b["central"] + 42, a["local"])
        out["swap_central_offsets"] = bytes(buf)
    buf = bytearray(data)
    struct.pack_into("<I", buf, pkl["central"] + 42, tensors[0]["local"])
    out["pickle_points_at_tensor"] = bytes(buf)
    out["appended_garbage"] = data + b"\x00garbage" * 8
    out["doubled"] = data + data
    out["only_central"] = data[recs[0]["central"]:]
    return out


def write(folder: Path) -> list[str]:
    data = BASE.read_bytes()
    made = cases(data)
    for name, blob in made.items():
        (folder / f"{name}.pt").write_bytes(blob)
    return sorted(made)


def main(argv: list[str]) -> int:
    if not BASE.exists():
        make_base(BASE)
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    names = write(out)
    if "--table" in argv:
        sys.path.insert(0, str(HERE.parent))
        from test_files_and_errors import classify_load, classify_verify

        rows = ["# file\tload\tverify_exit"]
        for name in names:
            path = out / f"{name}.pt"
            rows.append(f"{name}.pt\t{classify_load(path)}\t{classify_verify(path)}")
        TABLE.write_text("\n".join(rows) + "\n")
    print(f"{len(names)} damaged files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

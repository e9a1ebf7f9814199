"""Peak memory of loading a Pick-a-Pic-style parquet file, and the cost of reading its images lazily.

Writes a parquet file of about --mib MiB in the published Pick-a-Pic layout (caption, jpg_0, jpg_1, label_0;
incompressible JPEG bytes), then, each in a fresh process, loads it with `formats.layouts.load_pickapic` and reports the
peak resident set size (VmHWM) above that of the same process after its imports, the time to load, and the
same after decoding 64 random images (each read costs a row group of its column). With --compare REV, the code
as of git revision REV (extracted with `git archive`) is measured the same way in the same run, side by side.

    python bench/parquet_memory.py                       # this checkout, row groups of 100 rows (as HF writes)
    python bench/parquet_memory.py --compare 2fef065     # ... and the data files at 2fef065
    python bench/parquet_memory.py --row-group 100000    # one row group per file
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = r"""
import json, random, sys, time
sys.path.insert(0, sys.argv[1])
import pyarrow.parquet, PIL.Image
try:
    from formats.images import load_image
    from formats.layouts import load_pickapic
except ImportError:  # an older revision: the loaders at the top level
    try:
        from images import load_image
        from layouts import load_pickapic
    except ImportError:  # older still: all in data.py
        from data import load_image, load_pickapic


def peak_mib():  # VmHWM: this process's peak resident set (unlike ru_maxrss, not inherited from the parent)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


base = peak_mib()
t = time.time()
pairs = load_pickapic(sys.argv[2])
load_s, loaded = time.time() - t, peak_mib()
rng = random.Random(0)
t = time.time()
for _ in range(64):
    load_image(rng.choice(pairs).images[rng.randrange(2)])
print(json.dumps({"pairs": len(pairs), "base": base, "loaded": loaded, "load_s": load_s,
                  "decode_s": time.time() - t, "decoded": peak_mib()}))
"""


def write_file(path: str, mib: float, row_group: int) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    rng = np.random.default_rng(0)
    rows, size = [], 0
    while size < mib * 2**20:
        images = []
        for _ in range(2):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
            images.append(buf.getvalue())
        size += sum(map(len, images))
        rows.append({"caption": f"caption {len(rows)}", "jpg_0": images[0], "jpg_1": images[1],
                     "label_0": float(len(rows) % 2)})
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group)
    return len(rows)


def measure(code_dir: str, path: str) -> dict:
    run = subprocess.run([sys.executable, "-c", MEASURE, code_dir, path], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=100)
    parser.add_argument("--row-group", type=int, default=100, help="rows per row group (HF writes 100 for images)")
    parser.add_argument("--compare", default="", help="a git revision whose data files are measured too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train-00000.parquet")
        rows = write_file(path, args.mib, args.row_group)
        print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB, {rows} rows, row groups of {args.row_group} rows")
        versions = {"this checkout": str(ROOT)}
        if args.compare:
            old = os.path.join(tmp, "old")
            os.makedirs(old)
            archive = subprocess.run(["git", "archive", args.compare], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
            versions[f"at {args.compare}"] = old
        for name, code in versions.items():
            r = measure(code, path)
            print(f"{name:24s} peak RSS over the imports: {r['loaded'] - r['base']:+7.1f} MiB after loading "
                  f"({r['load_s']:.2f} s), {r['decoded'] - r['base']:+7.1f} MiB after decoding 64 random images "
                  f"({r['decode_s']:.2f} s); imports alone {r['base']:.0f} MiB")


if __name__ == "__main__":
    main()

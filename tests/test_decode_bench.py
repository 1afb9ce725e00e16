"""benchmarks/decode_bench.py's greedy loop (static cache, explicit positions and 4D mask) on CPU:
its tokens equal a no-cache recompute for dense and CoSpaDi models (the GPU run adds CUDA graphs)."""

import json

from benchmarks import decode_bench


def test_static_cache_decode_matches_recompute(tmp_path):
    decode_bench.main(["--device", "cpu", "--models", "tiny", "--ratios", "0.3", "--batch", "1", "3",
                       "--steps", "6", "--repeats", "1", "--out", str(tmp_path)])
    (result_file,) = tmp_path.glob("decode-*.json")
    results = json.loads(result_file.read_text())["results"]
    assert [(r["variant"], r["batch"]) for r in results] == [("dense", 1), ("dense", 3), ("cospadi-cr0.3", 1),
                                                             ("cospadi-cr0.3", 3)]
    assert all(r["note"] == "" and r["tokens_per_second"] > 0 for r in results), results
    dense, cospadi = results[0]["linear_bytes"], results[2]["linear_bytes"]
    assert cospadi < dense  # the compressed linears hold fewer bytes

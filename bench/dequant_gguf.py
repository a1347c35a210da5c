#!/usr/bin/env python3
"""Write a copy of a GGUF with every tensor dequantised to F32 (metadata copied unchanged except
general.file_type = 0). Lets llama.cpp run the very weights transformers sees after its own
dequantisation, so the two float32 forwards can be compared directly (bench/check_fixtures.py).

    "$(bench/setup_peers.sh --print-venv)"/bin/python bench/dequant_gguf.py IN.gguf OUT-f32.gguf
"""

from __future__ import annotations

import os
import sys

import numpy as np


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: dequant_gguf.py IN.gguf OUT.gguf")
    import gguf

    src, dst = sys.argv[1], sys.argv[2]
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    tmp = dst + ".tmp"
    w = gguf.GGUFWriter(tmp, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = field.contents()
        if key == "general.file_type":
            val = int(gguf.LlamaFileType.ALL_F32)
        w.add_key_value(key, val, vtype, sub_type=sub)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # numpy order is the reverse of GGUF's ne order
        data = data.reshape(tuple(int(d) for d in reversed(t.shape)))
        w.add_tensor(t.name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, dst)
    print(f"wrote {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()

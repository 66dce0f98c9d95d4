"""Write each kernel's Metal translation to ``metal/`` as a complete source, with the
signature MLX's ``mx.fast.metal_kernel`` would generate for one representative
configuration (template values fixed at the top of the body, so a host compiler
checks every line). ``python -m jang.kernels.metal_export [folder]``; CI compiles the
result against ``metal/shim.h`` and checks the committed copies are current.
"""

import sys
from pathlib import Path

from . import dialect

# kernel -> (inputs as (name, Metal type), output type, fixed template values)
CONFIGS = {
    "qmv": ([("x", "half"), ("w", "uint32_t"), ("scales", "half"), ("biases", "half")], "half",
            "typedef half T; constexpr int BITS = 3; constexpr int GS = 64; constexpr int R = 2; "
            "constexpr int MT = 2; constexpr int U = 2; constexpr int WARPS = 4;"),
    "qmm": ([("x", "bfloat"), ("w", "uint32_t"), ("scales", "bfloat"), ("biases", "bfloat")], "bfloat",
            "typedef bfloat T; constexpr int BITS = 5; constexpr int GS = 32; constexpr int WM = 2; "
            "constexpr int WN = 2; constexpr int FM = 2; constexpr int FN = 2;"),
    "swiglu": ([("x", "half"), ("wg", "uint32_t"), ("sg_", "half"), ("bg_", "half"), ("wu", "uint32_t"),
                ("su_", "half"), ("bu_", "half")], "half",
               "typedef half T; constexpr int BITS = 4; constexpr int GS = 64; constexpr int MT = 1; constexpr int WARPS = 4;"),
    "qgather": ([("ids", "uint32_t"), ("w", "uint32_t"), ("scales", "half"), ("biases", "half")], "half",
                "typedef half T; constexpr int BITS = 6; constexpr int GS = 128;"),
    "norm_rope": ([("x", "half"), ("weight", "half"), ("inv_freq", "float"), ("offset", "int"), ("eps", "float")], "half",
                  "typedef half T; constexpr int D = 128; constexpr bool ROPE = true; constexpr bool TRADITIONAL = false; "
                  "constexpr int WARPS = 4;"),
    "attention": ([("q", "half"), ("k", "half"), ("v", "half"), ("scale", "float")], "half",
                  "typedef half T; constexpr int D = 128; constexpr int WINDOW = 0; constexpr int WARPS = 4;"),
    "attention_split": ([("q", "half"), ("k", "half"), ("v", "half"), ("pos", "int"), ("scale", "float"),
                         ("counter", "int")], "half",
                        "typedef half T; constexpr int D = 128; constexpr int G = 4; constexpr int PER = 8; "
                        "constexpr int WARPS = 4;"),
    "concat": ([("p0", "half"), ("p1", "half"), ("p2", "half")], "half", "typedef half T; constexpr int ROW = 2048;"),
}

# text a launch sets (dialect.source's macros), as the representative configuration has it
MACROS = {"concat": (("JG_INPUTS", "JG_EACH(0, p0) JG_EACH(1, p1) JG_EACH(2, p2)"),)}

# the fused decode variants: name -> (body, defines, extra inputs, extra outputs)
VARIANTS = {
    "qmv_norm_resid": ("qmv", ("JG_NORM", "JG_RESID"), [("norm_w", "half"), ("eps", "float"), ("resid", "half")], []),
    "qmv_multi_norm": ("qmv", ("JG_MULTI", "JG_NORM"),
                       [("w1", "uint32_t"), ("scales1", "half"), ("biases1", "half"), ("w2", "uint32_t"),
                        ("scales2", "half"), ("biases2", "half"), ("norm_w", "half"), ("eps", "float")],
                       ["out1", "out2"]),
    "swiglu_norm": ("swiglu", ("JG_NORM",), [("norm_w", "half"), ("eps", "float")], []),
    "qmv_multi_norm_rope": ("qmv", ("JG_MULTI", "JG_NORM", "JG_ROPE"),
                            [("w1", "uint32_t"), ("scales1", "half"), ("biases1", "half"), ("w2", "uint32_t"),
                             ("scales2", "half"), ("biases2", "half"), ("norm_w", "half"), ("eps", "float"),
                             ("inv_freq", "float"), ("offset", "int")], ["out1", "out2"]),
    # the whole decode step's: k and v as one array (qmv); attention over every block's buffer
    "qmv_multi_kv_pair_norm_rope": ("qmv", ("JG_MULTI", "JG_KV_PAIR", "JG_NORM", "JG_ROPE"),
                                    [("w1", "uint32_t"), ("scales1", "half"), ("biases1", "half"),
                                     ("w2", "uint32_t"), ("scales2", "half"), ("biases2", "half"),
                                     ("norm_w", "half"), ("eps", "float"), ("inv_freq", "float"), ("offset", "int")],
                                    ["out1"]),
    "attention_split_step_kv": ("attention_split", ("JG_STEP_KV",), [("kv_new", "half"), ("rows", "int")], []),
    # the keys fit one split: the normalised output (T) written by step 1 itself
    "attention_split_final": ("attention_split", ("JG_FINAL",), [], []),
}

# more outputs of a body, with their own types, unless the define named first is set
OUTPUTS_OF_BODY = {"attention_split": ("JG_FINAL", [("part", "float")])}  # the splits' partials


def more_outputs(body_name: str, defines) -> list:
    """(name, type) of the outputs OUTPUTS_OF_BODY adds to this build of body_name."""
    unless, more = OUTPUTS_OF_BODY.get(body_name, (None, []))
    return [] if unless in defines else more

# the [[attribute]] arguments MLX adds for the built-in names a body uses
ATTRIBUTES = ("thread_position_in_threadgroup", "threadgroup_position_in_grid",
              "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup")


def metal_source(name: str) -> str:
    body_name, defines, extra_in, extra_out = VARIANTS.get(name, (name, (), [], []))
    inputs, out_type, template = CONFIGS[body_name]
    if "JG_ROPE" in defines:
        template += " constexpr int D = 128; constexpr bool TRADITIONAL = true;"
    inputs = inputs + extra_in
    head, body = dialect.source(body_name, "metal", defines, macros=MACROS.get(body_name, ()))  # the text MLX gets
    args, slot = [], 0
    for n, t in inputs:
        args.append(f"const device {t}* {n} [[buffer({slot})]]")
        slot += 1
        for suffix, decl in (("_shape", "const constant int*"), ("_strides", "const constant int64_t*"),
                             ("_ndim", "const constant int&")):
            if n + suffix in body:
                args.append(f"{decl} {n}{suffix} [[buffer({slot})]]")
                slot += 1
    for o in ["out", *extra_out, *more_outputs(body_name, defines)]:
        o, o_type = o if isinstance(o, tuple) else (o, out_type)
        args.append(f"device {o_type}* {o} [[buffer({slot})]]")
        slot += 1
    for attr in ATTRIBUTES:
        if attr in body:
            kind = "uint3" if "position" in attr else "uint"
            args.append(f"{kind} {attr} [[{attr}]]")
    signature = f"[[kernel]] void jang_{name}(\n    " + ",\n    ".join(args) + ")"
    return (f"// Generated by `python -m jang.kernels.metal_export` from jang/kernels/src/{body_name}.body {' '.join(defines)};"
            " do not edit.\n" + head + "\n" + signature + " {\n" + template + "\n" + body + "}\n")


def export(folder: Path) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in [*CONFIGS, *VARIANTS]:
        path = folder / f"{name}.metal"
        path.write_text(metal_source(name))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in export(Path(sys.argv[1] if len(sys.argv) > 1 else "metal")):
        print(p)

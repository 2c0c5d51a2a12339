"""Build the tone-coded self-test models (ONNX graphs, no training).

Both models read sherpa-onnx's 80-bin log-mel frames (10 ms apart). Per frame,
digit d scores max(log-mel in band d) - mean(all 80 bins) and blank scores
BLANK_SCORE, so a pure tone from `tones.synth` wins its band and silence or
white noise stays blank.

- zipformer_ctc: max-pool the scores over 4 frames (sherpa's fixed subsampling)
  and emit log-probs; sherpa's CTC search drops blanks and repeats.
- paraformer: sherpa takes the argmax of each output row until `</s>`, so the
  graph does the CTC collapse itself: keep frames whose class is a digit that
  differs from the previous frame, move them first in time order (TopK), write
  one one-hot row per kept frame then `</s>`, and a us_cif_peak at each kept
  frame's time (0.02 s steps) plus the extra final peak sherpa drops.

Variants of the paraformer model, same outputs:
- `--heavy`: a chain of MatMul layers, for a realistic decode cost;
- `--weights-mb N`: about N MiB of weights stored in the file that every decode reads
  (one MatMul of the mean frame, times 0), so a worker's memory grows by N MiB and
  the memory plan, which reads the file's size, sees them: a real model's weight
  without a download.

The output is the same bytes on every run: fixed names, no timestamps, no
random weights. `onnx` is a build-time dependency only, so it is imported
inside the functions.
"""

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsd.models import EMBEDDED_MODEL_DIR
from capsd.selftest.tones import BINS_PER_BAND, DIGIT_TOKENS, FIRST_BIN

OPSET, IR_VERSION = 17, 8
MIB = 2**20
PRODUCER = ("capsd.selftest", "1")
BLANK_SCORE = 6.0
# The names of a real release, which capsd looks for by default (the weights are float).
MODEL_FILE, TOKENS_FILE = "model.int8.onnx", "tokens.txt"

# Paraformer vocabulary laid out like a real one: specials first, <unk> last.
PARAFORMER_TOKENS = ["<blank>", "<s>", "</s>", *DIGIT_TOKENS, "<unk>"]
EOS_ID = PARAFORMER_TOKENS.index("</s>")
FIRST_DIGIT_ID = PARAFORMER_TOKENS.index(DIGIT_TOKENS[0])
# The CTC model uses the same CJK digit tokens, so both give "三一四" as text.
CTC_TOKENS = ["<blk>", *DIGIT_TOKENS]

LFR_WINDOW, LFR_SHIFT, NUM_MEL = 7, 6, 80
PEAK_FRAMES = 2  # us_cif_peak steps are 0.02 s: 10 ms frames x LFR 6 / upsampling 3

# Heavy variant: decode cost like a real Paraformer (RTF ~0.045 at 1 thread).
HEAVY_WIDTH, HEAVY_LAYERS = 1024, 96


class _Graph:
    """Collects nodes and constants under short, deterministic names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def const(self, value: Any, dtype: type = np.int64) -> str:
        from onnx import numpy_helper

        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: Sequence[str] = (), **attrs: Any) -> str:
        """Add a node; returns its first output (named `out`, else generated)."""
        from onnx import helper

        names = list(out) or [f"{op_type.lower()}{len(self.nodes)}"]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0]

    def filled(self, shape: str, value: float, out: Sequence[str] = ()) -> str:
        from onnx import TensorProto, helper

        fill = helper.make_tensor("value", TensorProto.FLOAT, [1], [value])
        return self.op("ConstantOfShape", shape, out=out, value=fill)

    def model(self, inputs: list[Any], outputs: list[Any], metadata: dict[str, str]) -> bytes:
        from onnx import checker, helper

        graph = helper.make_graph(self.nodes, "tone_model", inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER[0],
            producer_version=PRODUCER[1],
        )
        helper.set_model_props(model, metadata)
        checker.check_model(model, full_check=True)
        return model.SerializeToString(deterministic=True)


def _value(name: str, elem_type: str, shape: list[str | int]) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, getattr(TensorProto, elem_type), shape)


def _frame_scores(g: _Graph, frames: str, blank_offset: str | None = None) -> str:
    """(N, F, 80) log-mel -> (N, F, 11) scores: blank, then digits 0-9."""
    bands = g.op("Slice", frames, g.const([FIRST_BIN]), g.const([NUM_MEL]), g.const([2]))
    bands = g.op("Reshape", bands, g.const([0, 0, 10, BINS_PER_BAND]))
    band_max = g.op("ReduceMax", bands, axes=[3], keepdims=0)
    mean = g.op("ReduceMean", frames, axes=[2], keepdims=1)
    digits = g.op("Sub", band_max, mean)
    blank = g.const([BLANK_SCORE], np.float32)
    if blank_offset is not None:
        blank = g.op("Add", blank, blank_offset)
    blank = g.op("Expand", blank, g.op("Shape", mean))
    return g.op("Concat", blank, digits, axis=2)


def _heavy_zero(g: _Graph, speech: str) -> str:
    """A chain of large MatMul+Tanh layers whose mean is multiplied by 0.

    The weights are stored in the file like a real model's, so the file's size says
    what loading it costs (the memory plan reads it). They come from a multiplicative
    hash of the index: integer arithmetic, so the bytes are the same on every machine.
    Tanh keeps every value finite, so the product is an exact 0 and the scores do
    not change.
    """

    def weights(rows: int) -> str:
        index = np.arange(rows * HEAVY_WIDTH, dtype=np.uint64)
        uniform = ((index * np.uint64(2654435761)) % np.uint64(2**32)).astype(np.float64) / 2**32 - 0.5
        return g.const((uniform * math.sqrt(12 / rows)).reshape(rows, HEAVY_WIDTH), np.float32)

    hidden = g.op("Tanh", g.op("MatMul", speech, weights(LFR_WINDOW * NUM_MEL)))
    square = weights(HEAVY_WIDTH)
    for _ in range(HEAVY_LAYERS):
        hidden = g.op("Tanh", g.op("MatMul", hidden, square))
    return g.op("Mul", g.op("ReduceMean", hidden, keepdims=0), g.const(0.0, np.float32))


def _unseen_zero(g: _Graph, speech: str, mib: int) -> str:
    """A MatMul against `mib` MiB of weights made when the session loads (ConstantOfShape),
    times 0: memory that the file's size does not show, as the memory plan's check after
    start must catch."""
    rows = LFR_WINDOW * NUM_MEL
    weights = g.filled(g.const([rows, mib * 2**20 // (4 * rows)]), 1 / rows)
    return g.op("Mul", g.op("ReduceMean", g.op("MatMul", speech, weights), keepdims=0), g.const(0.0, np.float32))


def _weights_zero(g: _Graph, speech: str, mib: int) -> str:
    """`mib` MiB of weights in the file, all read by each decode, times 0.

    An initializer that no run reads can be folded or dropped by onnxruntime, so the
    weights are the B of a MatMul whose A is the mean LFR frame: one pass over them per
    decode (a 1 x 560 by 560 x K product), cheap next to a MatMul of every frame. The
    values are the same index hash as `_heavy_zero`'s, scaled small; Tanh keeps the
    product with 0 an exact 0 (the mean of an empty segment is NaN, but then there are
    no frames to score).
    """
    rows = LFR_WINDOW * NUM_MEL
    cols = max(1, round(mib * MIB / (4 * rows)))
    hashed = np.arange(rows * cols, dtype=np.uint32) * np.uint32(2654435761)  # wraps mod 2**32
    uniform = hashed.astype(np.float32) / np.float32(2**32) - np.float32(0.5)
    weights = g.const((uniform / rows).reshape(rows, cols), np.float32)
    mean_frame = g.op("ReduceMean", speech, axes=[1], keepdims=1)  # (N, 1, 560)
    product = g.op("Tanh", g.op("ReduceMean", g.op("MatMul", mean_frame, weights), keepdims=0))
    return g.op("Mul", product, g.const(0.0, np.float32))


def paraformer_model(heavy: bool = False, unseen_mib: int = 0, weights_mib: int = 0) -> bytes:
    """The paraformer-format tone model, serialised."""
    from onnx import TensorProto

    g = _Graph()
    # Undo the LFR stacking: LFR frame t holds fbank frames 6t..6t+6.
    frames = g.op("Reshape", "speech", g.const([0, 0, LFR_WINDOW, NUM_MEL]))
    frames = g.op("Slice", frames, g.const([0]), g.const([LFR_SHIFT]), g.const([2]))
    frames = g.op("Reshape", frames, g.const([0, -1, NUM_MEL]))
    offset = _heavy_zero(g, "speech") if heavy else None
    if unseen_mib:
        unseen = _unseen_zero(g, "speech", unseen_mib)
        offset = g.op("Add", offset, unseen) if offset else unseen
    if weights_mib:
        weights = _weights_zero(g, "speech", weights_mib)
        offset = g.op("Add", offset, weights) if offset else weights
    scores = _frame_scores(g, frames, offset)

    # Frames past speech_lengths are batch padding: force them to blank.
    num_frames = g.op("Slice", g.op("Shape", frames), g.const([1]), g.const([2]))
    frame_index = g.op("Range", g.const(0), g.op("Squeeze", num_frames), g.const(1))
    frame_row = g.op("Unsqueeze", frame_index, g.const([0]))  # (1, F)
    lengths = g.op("Cast", "speech_lengths", to=TensorProto.INT64)
    lengths = g.op("Unsqueeze", g.op("Mul", lengths, g.const(LFR_SHIFT)), g.const([1]))
    zero = g.const(0)
    cls = g.op("ArgMax", scores, axis=2, keepdims=0)  # (N, F); 0 is blank
    cls = g.op("Where", g.op("Less", frame_row, lengths), cls, zero)

    padded = g.op("Pad", cls, g.const([0, 1, 0, 0]))
    previous = g.op("Slice", padded, g.const([0]), g.const([-1]), g.const([1]))
    is_digit = g.op("Not", g.op("Equal", cls, zero))
    keep = g.op("And", is_digit, g.op("Not", g.op("Equal", cls, previous)))

    # Kept frames first, each group in time order: key = keep * 1e7 - frame.
    key = g.op("Mul", g.op("Cast", keep, to=TensorProto.FLOAT), g.const(1e7, np.float32))
    key = g.op("Sub", key, g.op("Cast", frame_row, to=TensorProto.FLOAT))
    g.op("TopK", key, num_frames, axis=1, out=["sort_keys", "order"])
    count = g.op("ReduceSum", g.op("Cast", keep, to=TensorProto.INT64), g.const([1]))
    is_token = g.op("Less", frame_row, count)  # (N, F): output row u < tokens kept

    token_id = g.op("Add", g.op("GatherElements", cls, "order", axis=1), g.const(FIRST_DIGIT_ID - 1))
    token_id = g.op("Where", is_token, token_id, g.const(EOS_ID))
    one_hot = g.const([0.0, 1.0], np.float32)
    vocab = len(PARAFORMER_TOKENS)
    g.op("OneHot", token_id, g.const([vocab]), one_hot, axis=-1, out=["logits"])
    g.op("Squeeze", count, g.const([1]), out=["token_num"])
    batch_time = g.op("Slice", g.op("Shape", "speech"), g.const([0]), g.const([2]))
    g.filled(batch_time, 0.0, out=["us_alphas"])

    # One peak per token at its first frame, which wins 0-20 ms after the tone
    # starts; the rows after the last token share the extra peak sherpa drops.
    num_peaks = g.op("Add", g.op("Div", num_frames, g.const(PEAK_FRAMES)), g.const([2]))
    peak = g.op("Div", "order", g.const(PEAK_FRAMES))
    peak = g.op("Where", is_token, peak, g.op("Sub", num_peaks, g.const([1])))
    batch = g.op("Slice", batch_time, g.const([0]), g.const([1]))
    no_peaks = g.filled(g.op("Concat", batch, num_peaks, axis=0), 0.0)
    ones = g.filled(g.op("Shape", peak), 1.0)
    g.op("ScatterElements", no_peaks, peak, ones, axis=1, out=["us_cif_peak"])

    inputs = [
        _value("speech", "FLOAT", ["N", "T", LFR_WINDOW * NUM_MEL]),
        _value("speech_lengths", "INT32", ["N"]),
    ]
    outputs = [
        _value("logits", "FLOAT", ["N", "U", vocab]),
        _value("token_num", "INT64", ["N"]),
        _value("us_alphas", "FLOAT", ["N", "T"]),
        _value("us_cif_peak", "FLOAT", ["N", "P"]),
    ]
    # Identity CMVN: the scores are differences of log-mel values anyway.
    stacked = LFR_WINDOW * NUM_MEL
    metadata = {
        "vocab_size": str(vocab),
        "lfr_window_size": str(LFR_WINDOW),
        "lfr_window_shift": str(LFR_SHIFT),
        "neg_mean": ",".join(["0"] * stacked),
        "inv_stddev": ",".join(["1"] * stacked),
    }
    return g.model(inputs, outputs, metadata)


def zipformer_ctc_model() -> bytes:
    """The zipformer_ctc-format tone model, serialised."""
    g = _Graph()
    scores = _frame_scores(g, "x")
    # Subsample by 4 with a max over fbank frames 4t-2..4t+1, so output frame t
    # (reported at 0.04 t s) fires when a tone starts near 0.04 t s. The extra
    # frame at the end is the pool's right padding, made explicit because
    # MaxPool rejects an empty input and sherpa does send one.
    scores = g.op("Transpose", scores, perm=[0, 2, 1])
    scores = g.op("Pad", scores, g.const([0, 0, 0, 0, 0, 1]), g.const(-1e9, np.float32))
    pooled = g.op("MaxPool", scores, kernel_shape=[4], strides=[4], pads=[2, 0])
    pooled = g.op("Transpose", pooled, perm=[0, 2, 1])
    g.op("LogSoftmax", pooled, axis=-1, out=["log_probs"])
    g.op("Div", g.op("Add", "x_lens", g.const(3)), g.const(4), out=["log_probs_len"])
    inputs = [_value("x", "FLOAT", ["N", "T", NUM_MEL]), _value("x_lens", "INT64", ["N"])]
    outputs = [
        _value("log_probs", "FLOAT", ["N", "S", len(CTC_TOKENS)]),
        _value("log_probs_len", "INT64", ["N"]),
    ]
    return g.model(inputs, outputs, {})


def _write(out_dir: Path, model: bytes, tokens: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_FILE).write_bytes(model)
    lines = "".join(f"{token} {i}\n" for i, token in enumerate(tokens))
    (out_dir / TOKENS_FILE).write_bytes(lines.encode())


def build_paraformer(out_dir: Path, heavy: bool = False, unseen_mib: int = 0, weights_mib: int = 0) -> None:
    """Write model.int8.onnx and tokens.txt of the paraformer tone model."""
    _write(out_dir, paraformer_model(heavy, unseen_mib, weights_mib), PARAFORMER_TOKENS)


def build_zipformer_ctc(out_dir: Path) -> None:
    """Write model.int8.onnx and tokens.txt of the zipformer_ctc tone model."""
    _write(out_dir, zipformer_ctc_model(), CTC_TOKENS)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capsd.selftest.build", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="directory to write the model into")
    parser.add_argument("--kind", choices=["paraformer", "zipformer_ctc"], default="paraformer")
    parser.add_argument("--heavy", action="store_true", help="paraformer with a realistic decode cost")
    parser.add_argument(
        "--weights-mb",
        type=int,
        default=0,
        metavar="N",
        help="paraformer with about N MiB of weights in the file, read by every decode (a worker's RSS grows by N MiB)",
    )
    parser.add_argument("--ship", action="store_true", help=f"rewrite the embedded model in {EMBEDDED_MODEL_DIR}")
    args = parser.parse_args(argv)
    if args.ship == (args.out_dir is not None):
        parser.error("give either OUT_DIR or --ship")
    if args.weights_mb < 0:
        parser.error("--weights-mb must be 0 or more")
    if (args.heavy or args.weights_mb) and args.kind != "paraformer":
        parser.error("--heavy and --weights-mb are for the paraformer kind only")
    if args.ship and (args.heavy or args.weights_mb or args.kind != "paraformer"):
        parser.error("the embedded model is the light paraformer")
    out_dir = EMBEDDED_MODEL_DIR if args.ship else args.out_dir
    if args.kind == "paraformer":
        build_paraformer(out_dir, heavy=args.heavy, weights_mib=args.weights_mb)
    else:
        build_zipformer_ctc(out_dir)
    print(f"wrote {out_dir / MODEL_FILE} and {out_dir / TOKENS_FILE}")


if __name__ == "__main__":
    main()

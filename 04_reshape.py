#!/usr/bin/env python
"""Step 4: drop the masks and physically shrink the linear layers of a pruned checkpoint.

Slices q/k/v rows, attention-output columns, FFN input rows and output columns, updates the
head-count attributes, and replaces fully pruned attention blocks. Saves a compact,
self-describing model (model.safetensors + config.json + tokenizer + pruning.json) that
common.load_model rebuilds without pickled modules, and that stock tools open without slimrank
(modeling_slimrank.py + auto_map: AutoModelForSequenceClassification / AutoModel /
sentence-transformers with trust_remote_code=True). --onnx also writes onnx/model.onnx and the
int8 onnx/model_int8.onnx (common.serving.onnx_export), the files of 05's --backend onnx|onnx-int8;
with --calibration_triples (training-side triples, never evaluation topics) the int8 graph is
quantized from a smoothed copy of the model (SmoothQuant), which keeps it closer to fp32;
--int8_keep_fp32 ROLE... leaves those projections of every layer in fp32 (e.g. ffn_out).
--openvino (implies --onnx) also converts the ONNX graph to OpenVINO IR, openvino/openvino_model.xml
(where sentence-transformers' OpenVINO backend looks; 05's --backend openvino), checked against
torch (common.serving.openvino_export); with --calibration_triples also the NNCF static int8 IR
openvino/openvino_model_qint8_quantized.xml (--backend openvino-int8), calibrated on those pairs,
its agreement with torch measured on the next --held_out_triples triples of the file.

  python 04_reshape.py --checkpoint_dir runs/mixed/seen_000010000_heads_058_ffn_07296 \
      --output_dir runs/mixed/seen_000010000_heads_058_ffn_07296/reshaped
  python 04_reshape.py --checkpoint_dir all-MiniLM-L6-v2 --model_kind bi --keep_layers 3 \
      --output_dir runs/baselines/minilm-bi-3layers      # layer dropping (L3Prune-style)
  python 04_reshape.py --checkpoint_dir all-MiniLM-L6-v2 --model_kind bi --keep_layers small \
      --layer_loss_triples data/distill/triples.tsv --output_dir runs/l3prune_small  # L3Prune
  python 04_reshape.py --checkpoint_dir runs/main/initial/seen_000002048 \
      --output_dir runs/main/initial_export --onnx        # an unpruned model, exported as it is
  python 04_reshape.py --checkpoint_dir runs/main/recover/seen_000020480_heads_054_ffn_04608 \
      --output_dir runs/main/final --onnx --calibration_triples data/distill/triples.tsv
  python 04_reshape.py --checkpoint_dir runs/main/final --output_dir runs/main/final_keep \
      --onnx --int8_keep_fp32 ffn_out               # int8, the FFN output projections in fp32
  python 04_reshape.py --checkpoint_dir runs/main/recover/seen_000020480_heads_054_ffn_04608 \
      --output_dir runs/main/final --openvino --calibration_triples data/distill/triples.tsv
"""
from __future__ import annotations

import argparse
import json

from common.kinds import KINDS
from common.cli import fail, parse_args, positive_int
from common.data.triples import DL20_TOPICS, calibration_pairs
from common.pruning.l3prune import (RULES, choose, earlier_layer_losses, layers_to_keep, layerwise_losses,
                                    parse_keep_layers)
from common.models.loading import QUERY_ENCODER_FIELD, model_depth
from common.kinds.loading import load_model, reshape_checkpoint
from common.models.st_format import POOLING_CHOICES
from common.serving.onnx_export import FP32_ROLES, export_onnx


def layers_arg(value: str) -> str | int | float:
    try:
        return parse_keep_layers(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--keep_layers {value}: ") + f", got {value!r}") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True)
    parser.add_argument("--output_dir", help="default: CHECKPOINT_DIR/reshaped")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--keep_layers", type=layers_arg,
                        help="layer dropping: keep only the first N layers (N >= 1), prune a share "
                             "of them (a fraction in (0, 1): 0.3 keeps int(0.7 L)), or the L3Prune choice "
                             "'small' / 'large' (common.pruning.l3prune: from the model's task loss at each "
                             "depth on --layer_loss_triples)")
    parser.add_argument("--layer_loss_triples", help="--keep_layers small|large: training triples to score")
    parser.add_argument("--layer_loss_rows", type=positive_int, default=256,
                        help="--keep_layers small|large: triples scored (the first N of the file)")
    parser.add_argument("--layer_losses", metavar="DIR",
                        help="--keep_layers small|large from the layerwise loss an earlier L3Prune drop of "
                             "the same checkpoint computed (its output dir or pruning.json), not computed "
                             "again: both configurations from one loss, as the seed's autoprune")
    parser.add_argument("--model_kind", choices=list(KINDS),
                        help="for a plain model dir or tag (e.g. a bi-encoder baseline)")
    parser.add_argument("--pooling", choices=POOLING_CHOICES,
                        help="bi-encoder from a plain model dir: its pooling (default: the dir's "
                             "sentence-transformers config, else mean; decoder LLMs last)")
    parser.add_argument("--query_instruction",
                        help="bi-encoder from a plain model dir: text put in front of every query, saved "
                             "as the sentence-transformers 'query' prompt (default: the dir's own)")
    parser.add_argument("--onnx", action="store_true",
                        help="also export OUTPUT_DIR/onnx/model.onnx and model_int8.onnx")
    parser.add_argument("--max_length", type=positive_int, default=256,
                        help="--onnx: length of the sample inputs the export is checked on")
    parser.add_argument("--calibration_triples",
                        help="--onnx: training-side triples whose pairs calibrate the smoothing of the "
                             "int8 graph (without it the int8 graph is quantized unsmoothed)")
    parser.add_argument("--calibration_pairs", type=positive_int, default=256,
                        help="--calibration_triples: pairs used (query + each passage of the first triples)")
    parser.add_argument("--eval_topics", nargs="*", default=[DL20_TOPICS], metavar="FILE",
                        help="--calibration_triples: evaluation topics (candidates parquet or shared JSON) "
                             "whose queries calibration may not use (default: DL20; none: give no file)")
    parser.add_argument("--allow_eval_overlap", action="store_true",
                        help="calibrate on evaluation queries anyway (the int8 numbers are then not held out)")
    parser.add_argument("--openvino", action="store_true",
                        help="also convert the ONNX graph to OUTPUT_DIR/openvino/openvino_model.xml (implies "
                             "--onnx); with --calibration_triples also the NNCF static int8 IR")
    parser.add_argument("--held_out_triples", type=positive_int, default=64,
                        help="--openvino --calibration_triples: triples after the calibration ones on which "
                             "the int8 IR's agreement with torch is measured")
    parser.add_argument("--int8_keep_fp32", nargs="+", choices=FP32_ROLES, default=[], metavar="ROLE",
                        help="--onnx: projections left in fp32 in every layer of the int8 graph "
                             f"({', '.join(FP32_ROLES)}; default: every projection int8)")
    args = parse_args(parser, argv)
    args.onnx = args.onnx or args.openvino  # the IR is converted from the ONNX graph
    if args.int8_keep_fp32 and not args.onnx:
        parser.error("--int8_keep_fp32 shapes the int8 export: it needs --onnx")
    if args.calibration_triples and not args.onnx:
        parser.error("--calibration_triples calibrates the int8 exports: it needs --onnx or --openvino")
    if args.keep_layers in RULES and not (args.layer_loss_triples or args.layer_losses):
        parser.error(f"--keep_layers {args.keep_layers} needs --layer_loss_triples or --layer_losses")
    if args.layer_losses and (args.keep_layers not in RULES or args.layer_loss_triples):
        parser.error("--layer_losses gives the loss of --keep_layers small|large in place of --layer_loss_triples")
    try:
        calibration, held_out = None, None  # read before anything is written: a bad file is an error
        if args.calibration_triples:
            calibration, held_out = calibration_pairs(
                args.calibration_triples, args.calibration_pairs, args.held_out_triples if args.openvino else 0,
                args.eval_topics, args.allow_eval_overlap)
        keep, note = args.keep_layers, None
        if keep is not None and keep not in RULES:
            keep = layers_to_keep(keep, model_depth(args.checkpoint_dir))
        if keep in RULES:
            source = {"checkpoint": args.checkpoint_dir, "pooling": args.pooling,
                      "query_instruction": args.query_instruction, "max_length": min(args.max_length, 128)}
            if args.layer_losses:
                earlier = earlier_layer_losses(args.layer_losses, source)
                losses, scored = earlier["losses"], {k: earlier[k] for k in ("triples", "rows")}
            else:
                losses = layerwise_losses(load_model(args.checkpoint_dir, kind=args.model_kind, pooling=args.pooling,
                                                     query_instruction=args.query_instruction),
                                          args.layer_loss_triples, args.layer_loss_rows,
                                          max_length=source["max_length"])
                losses = [round(x, 6) for x in losses]
                scored = {"triples": args.layer_loss_triples, "rows": args.layer_loss_rows}
            chosen = choose(losses)
            keep = chosen[args.keep_layers]
            note = {"l3prune": {"rule": args.keep_layers, "losses": losses, **chosen, **scored, **source}}
            print("L3Prune: task loss after each layer " + ", ".join(f"{i + 1}: {x:.4f}" for i, x in enumerate(losses))
                  + f"; small = {chosen['small']}, large = {chosen['large']} layers: keeping {keep}")
        exported = {}

        def export(directory):  # into the new model dir, before it replaces an old one
            exported.update(export_onnx(load_model(str(directory)), directory, args.max_length, calibration,
                                        tuple(args.int8_keep_fp32), calibration_source=args.calibration_triples))
            if args.openvino:
                from common.serving.openvino_export import export_openvino  # openvino + nncf: only here
                exported["ir"] = export_openvino(load_model(str(directory)), directory, args.max_length,
                                                 calibration, held_out, args.calibration_triples)
        inputs = {"--calibration_triples": args.calibration_triples, "--layer_loss_triples": args.layer_loss_triples,
                  **{"--eval_topics": t for t in args.eval_topics if t}}
        out, before, after = reshape_checkpoint(args.checkpoint_dir, args.output_dir, args.overwrite,
                                                keep, args.model_kind, note, inputs=inputs,
                                                finish=export if args.onnx else None, pooling=args.pooling,
                                                query_instruction=args.query_instruction)
        print(f"wrote {out}: {before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters")
        queries = json.loads((out / "config.json").read_text()).get(QUERY_ENCODER_FIELD)
        if queries:
            print(f"note: {out} embeds passages only; its queries go through {queries!r} ({QUERY_ENCODER_FIELD} "
                  "in its config.json): slimrank's Ranker does so, a stock SentenceTransformer of this dir "
                  "does not (encode the queries with that model)")
        if args.onnx:
            info = exported
            print(f"wrote {out}/onnx: fp32 and int8 graphs (max |onnx - torch| on sample inputs: "
                  f"fp32 {info['onnx']['max_abs_diff_vs_torch']:.1e}, "
                  f"int8 {info['onnx-int8']['max_abs_diff_vs_torch']:.1e})")
        if args.openvino:
            info = exported["ir"]
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in info["openvino"]["max_abs_diff_vs_torch"].items())
            print(f"wrote {out}/openvino: the IR (max |openvino - torch| on sample inputs: {diffs}; "
                  f"this CPU runs it in {info['exported_on_default_precision']})")
            int8 = info.get("openvino-int8")
            if int8 is None:
                print("note: no --calibration_triples: no int8 IR (openvino-int8 needs calibration pairs)")
            elif int8["held_out"]:
                h = int8["held_out"]
                print(f"int8 IR on {h['triples']} held-out training-side triples: max |int8 - torch| "
                      f"{h['max_abs_diff_vs_torch']:.2e}, mean {h['mean_abs_diff_vs_torch']:.2e}, "
                      f"pair order as torch's in {h['order_agreement']:.1%}")
            else:
                print(f"note: {args.calibration_triples} has no triples after the calibration ones: "
                      "the int8 IR's agreement was measured on the sample inputs only")
    except (FileExistsError, ValueError, OSError) as err:
        fail(err)


if __name__ == "__main__":
    main()

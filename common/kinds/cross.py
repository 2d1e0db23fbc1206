"""The cross-encoder kind (monoBERT, Nogueira & Cho 2019): a (query, passage) pair is one
sequence (the model's own pair layout: the monoBERT template, or the segment head's,
``common.models.segment``); its score is the relevant-class logit (``relevance_logit``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import AutoModel, AutoModelForSequenceClassification

from common.kinds.base import Forward, ModelKind, chunked_call, register_kind
from common.models import st_format
from common.models.decoders import check_cross_head
from common.models.loading import (NUM_LABELS, autocast_context, bare_encoder, check_weights_found, encode_pairs,
                                   relevance_logit, segment_pair_template, sorted_batches, trained_head_labels)
from common.models.segment import SegmentCrossEncoder, is_segment


@register_kind("cross")
class CrossKind(ModelKind):
    """Cross-encoder: the task loss on the scores of each row's passages (or the 2-label
    logits), distillation on the teacher's scores or (segment head) its segment embeddings."""

    output = "scores"
    default_head = "classifier"

    @staticmethod
    def runner_output(model, input_ids, attention_mask, extra):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
        return relevance_logit(logits).float()

    @classmethod
    def score(cls, ranker, queries, passages, progress=False):
        features = encode_pairs(ranker.tokenizer, list(queries), list(passages), ranker.max_length,
                                ranker.loaded.model, padding=False)
        scores = np.empty(len(queries), dtype=np.float32)
        for idx, batch in sorted_batches(ranker.tokenizer, features, ranker.batch_size, progress):
            scores[idx] = ranker.runner(dict(batch))
        return scores

    @staticmethod
    def sequences_per_query(n_pairs):
        return n_pairs  # one (query, passage) sequence per candidate


    @classmethod
    def build(cls, path, tokenizer, head, pooling):
        if head == "segment_cosine":
            encoder = bare_encoder(path, pooling)
            check_cross_head(encoder.config, head, path)  # decoders re-rank with their classification head
            return SegmentCrossEncoder(encoder, tokenizer.sep_token_id)
        labels = trained_head_labels(path)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=labels or NUM_LABELS, trust_remote_code=False, output_loading_info=True)
        check_weights_found(model, info, path)
        if labels and Path(path).is_dir():
            activation = st_format.read_cross_activation(Path(path))
            if activation:
                model.config.slimrank_activation_fn = activation
        return model

    @classmethod
    def check_saved_head(cls, path, saved_head, head):
        if head is not None and head != saved_head:
            raise ValueError(f"{path} has a {saved_head} head, not --head {head}")

    @classmethod
    def empty_model(cls, config, saved_head):
        if saved_head != "classifier":
            return AutoModel.from_config(config)
        return AutoModelForSequenceClassification.from_config(config)

    @classmethod
    def finish_loaded(cls, model, config, saved_head):
        return SegmentCrossEncoder(model) if saved_head != "classifier" else model

    @classmethod
    def save_files(cls, model, directory, tensors):
        if is_segment(model):
            segment_pair_template(Path(directory) / "tokenizer.json")

    @classmethod
    def stock_config(cls, model, config):
        role, auto = ("segment" if is_segment(model) else "classifier"), "AutoModelForSequenceClassification"
        one = role == "segment" or config.num_labels == 1
        config.id2label = {0: "relevance"} if one else {0: "not_relevant", 1: "relevant"}
        config.label2id = {v: k for k, v in config.id2label.items()}
        activation = None if role == "segment" else getattr(config, st_format.ACTIVATION_FIELD, None)
        config.sentence_transformers = {"activation_fn": activation or "torch.nn.modules.linear.Identity"}
        return role, auto

    @classmethod
    def check_args(cls, args, model):
        if args.distill_target == "embeddings" and not is_segment(model):
            raise ValueError("--distill_target embeddings needs a bi-encoder or the segment_cosine head")

    @classmethod
    def label_loss(cls, args, model):
        one_score = is_segment(model) or model.config.num_labels == 1  # a 1-label head: listwise
        return ("row_softmax" if one_score else "cross_entropy"), {}

    def forward(self, model, rows, wanted):
        n = len(rows[0]) - 1
        queries = [row[0] for row in rows for _ in range(n)]
        passages = [x for row in rows for x in row[1:]]
        batch = encode_pairs(self.tokenizer, queries, passages, self.max_length, self.model).to(self.device)
        with autocast_context(self.device, self.precision):
            output = chunked_call(model, batch, self.length_chunk)
        logits = output.logits.float()
        student = relevance_logit(logits).view(len(rows), n)
        return Forward({"logits": logits, "scores": student}, batch, {"output": output, "rows": n})

    def teacher_forward(self, teacher, rows, student):
        with autocast_context(self.device, self.precision):
            return {"output": chunked_call(teacher, student.batch, self.length_chunk)}

    def distill_inputs(self, student, teacher, target):
        if target == "embeddings":
            keys = ("query_embeddings", "passage_embeddings")
            return ([getattr(student.extra["output"], k) for k in keys],
                    [getattr(teacher["output"], k) for k in keys])
        scores = student.inputs["scores"]
        return scores, relevance_logit(teacher["output"].logits.float()).view(*scores.shape)

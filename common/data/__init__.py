"""Data on disk: candidate lists and their readers, the first stage (BM25), training triples, the teacher-scored distillation set."""

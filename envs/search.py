"""A local search tool over a document collection (the `search_qa` task, `rl.tasks.search_qa`, needs it).

`search(query, k)` ranks documents with BM25 (`bm25s`, a maintained pure-Python/numpy implementation) and returns
the top `k` as numbered snippets. The collection is a JSONL file of `{"id", "title", "text"}` objects; the project
ships `envs/data/islands.jsonl` (80 generated, fictional island nations, so no model can know the answers without
searching), and `env.kwargs.corpus` points the environment at your own. Each corpus is indexed once per process
and shared by every environment instance (environments are created per sample).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import bm25s

from envs.registry import register_env
from envs.tools import ToolEnv, ToolError, tool

DEFAULT_CORPUS = Path(__file__).parent / "data" / "islands.jsonl"
MAX_K = 10


class Corpus:
    """Documents and their BM25 index."""

    def __init__(self, path: Path) -> None:
        self.docs: list[dict[str, Any]] = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            doc = json.loads(line)
            if not isinstance(doc.get("text"), str):
                raise ValueError(f"{path}:{n}: every document needs a string 'text'")
            self.docs.append(doc)
        if not self.docs:
            raise ValueError(f"{path}: no documents")
        self.retriever = bm25s.BM25()
        self.retriever.index(
            self._tokenize([f"{d.get('title', '')} {d['text']}" for d in self.docs]), show_progress=False
        )

    @staticmethod
    def _tokenize(texts: list[str]) -> Any:
        return bm25s.tokenize(texts, stopwords="en", show_progress=False)

    def search(self, query: str, k: int) -> list[dict[str, Any]]:
        k = min(k, len(self.docs))
        ids, scores = self.retriever.retrieve(self._tokenize([query]), k=k, show_progress=False)
        return [self.docs[int(i)] for i, s in zip(ids[0], scores[0], strict=True) if s > 0]


@functools.cache
def load_corpus(path: str) -> Corpus:
    return Corpus(Path(path))


@register_env("search")
class SearchEnv(ToolEnv):
    """One tool, `search(query, k)`, over a JSONL document collection."""

    def __init__(self, corpus: str | None = None) -> None:
        path = Path(corpus).expanduser() if corpus else DEFAULT_CORPUS
        if not path.is_file():
            raise FileNotFoundError(
                f"env.kwargs.corpus: {path} does not exist (a JSONL file of {{'title', 'text'}} documents)"
            )
        self.corpus = load_corpus(str(path.resolve()))

    @tool
    def search(self, query: str, k: int = 3) -> str:
        """Search the documents.

        Args:
            query: Keywords to look for.
            k: How many documents to return (1 to 10).
        """
        if not 1 <= k <= MAX_K:
            raise ToolError(f"k must be between 1 and {MAX_K}, got {k}")
        hits = self.corpus.search(query, k)
        if not hits:
            return "No document matches."
        return "\n".join(f"[{i}] {d.get('title', d.get('id', ''))}: {d['text']}" for i, d in enumerate(hits, 1))

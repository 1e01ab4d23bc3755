"""The reference worker's results: one row per signal in `signal_scores`, written idempotently."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Engine

SCORES_TABLE = "signal_scores"


@dataclass(frozen=True)
class ScoreSummary:
    count: int
    top: list[tuple[int, str | None, float]]


class ScoresStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.t = engine.dialect.identifier_preparer.quote(SCORES_TABLE)

    def ensure_table(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(
                f"CREATE TABLE IF NOT EXISTS {self.t} ("
                " signal_id BIGINT PRIMARY KEY,"
                " name TEXT,"
                " score DOUBLE PRECISION NOT NULL,"
                " scored_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            ))

    def record(self, signal_id: int, name: str | None, score: float) -> bool:
        """Store a score once; a redelivered task finds the row and adds nothing. True if new."""
        with self.engine.begin() as conn:
            result = conn.execute(
                text(
                    f"INSERT INTO {self.t} (signal_id, name, score) VALUES (:id, :name, :score)"
                    " ON CONFLICT (signal_id) DO NOTHING"
                ),
                {"id": signal_id, "name": name, "score": score},
            )
            return result.rowcount == 1

    def summary(self, top: int = 5) -> ScoreSummary:
        with self.engine.connect() as conn:
            count = conn.execute(text(f"SELECT COUNT(*) FROM {self.t}")).scalar_one()
            rows = conn.execute(
                text(f"SELECT signal_id, name, score FROM {self.t} ORDER BY score DESC, signal_id LIMIT :n"),
                {"n": top},
            ).all()
        return ScoreSummary(count=int(count), top=[(int(r[0]), r[1], float(r[2])) for r in rows])

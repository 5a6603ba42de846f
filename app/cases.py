"""The case record: every answer the app gives, the clinician's overread of it, and what
monitoring reads back.

One row a prediction (page, API, batch row; films refused as outside the intended use
included; a file that could not be read is no prediction and leaves no row): an
unguessable ``case_id``, when, the model version, where it came from, the file's kind and
SHA-256, the probability, threshold and decision or the reasons it got none, the gate's
score, the learned features (float16, for drift and the map), the age if given and the
user a trusted proxy names. Never pixels, file names or DICOM header values.

The database is any SQLAlchemy URL (``DATABASE_URL``): a SQLite file under ``instance/``
by default, PostgreSQL where several servers share one. Its schema is Alembic's
(``app/migrations``), brought up to date at start-up. A database that is down or full
never fails a prediction: ``record`` returns None, the page says the answer was not
recorded, ``/healthz`` says the record is degraded, and the next write tries again.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

from model.coalesce import Coalescer
from model.dicom import is_dicom

log = logging.getLogger("app")

READS = ("pneumonia", "normal", "uncertain")
#: The longest note an overread keeps (the column's size); a longer one is refused, never cut.
NOTE_LIMIT = 500
SOURCES = ("page", "api", "batch", "dicom")
#: Where a structured report stands on its way to the PACS.
DELIVERY_STATES = ("pending", "sent", "failed")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: How long after a failed write the record waits before trying the database again.
RETRY_S = 2.0


class Base(DeclarativeBase):
    pass


class Case(Base):
    __tablename__ = "cases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(String(32), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    model_version: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(8))
    file_kind: Mapped[str] = mapped_column(String(8))
    input_sha256: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    decision: Mapped[str | None] = mapped_column(String(16))  # PNEUMONIA, NORMAL; None when refused
    refusal: Mapped[str | None] = mapped_column(String(64))  # the checks that refused it: "image", "age"...
    gate_score: Mapped[float | None] = mapped_column(Float)
    features: Mapped[bytes | None] = mapped_column(LargeBinary)
    age_years: Mapped[float | None] = mapped_column(Float)
    user: Mapped[str | None] = mapped_column(String(128))
    overread: Mapped[str | None] = mapped_column(String(16))  # the latest overread, for the worklist's filters
    # A film from the PACS: the UIDs that link the case to its study (no patient data; SECURITY.md)
    study_uid: Mapped[str | None] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64))
    sop_uid: Mapped[str | None] = mapped_column(String(64))
    overreads: Mapped[list[Overread]] = relationship(back_populates="case", order_by="Overread.id")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="case", order_by="Delivery.id")

    __table_args__ = (Index("ix_cases_version_created", "model_version", "created_at"),
                      Index("ix_cases_created", "created_at"),
                      Index("ix_cases_probability", "probability"),
                      Index("ix_cases_overread_created", "overread", "created_at"),
                      Index("ix_cases_version_overread", "model_version", "overread", "decision"),
                      UniqueConstraint("sop_uid", name="uq_cases_sop_uid"))

    @property
    def refused(self) -> bool:
        return self.decision is None


class Overread(Base):
    """A clinician's final read of a case; a change is a new row, never an update."""

    __tablename__ = "overreads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_pk: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    read: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(String(NOTE_LIMIT))
    user: Mapped[str | None] = mapped_column(String(128))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    case: Mapped[Case] = relationship(back_populates="overreads")


class Delivery(Base):
    """A structured report on its way back into the film's study (the DICOM node's outbox).
    The report itself waits in the node's spool folder under ``sr_uid``; the same report, with
    the same UIDs, goes out on every try."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_pk: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    sr_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(8))  # DELIVERY_STATES
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    next_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    done_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String(200))
    case: Mapped[Case] = relationship(back_populates="deliveries")

    __table_args__ = (Index("ix_deliveries_state_next", "state", "next_at"),)


@dataclass(frozen=True)
class StudyLink:
    """The DICOM UIDs of a film from the PACS, kept with its case to answer into its study."""

    study_uid: str
    series_uid: str
    sop_uid: str


def file_kind(data: bytes) -> str:
    """The upload's format from its first bytes (what the record keeps instead of its name)."""
    if is_dicom(data):
        return "dicom"
    for magic, kind in ((b"\xff\xd8", "jpeg"), (b"\x89PNG", "png"), (b"II*\0", "tiff"), (b"MM\0*", "tiff"),
                        (b"BM", "bmp"), (b"GIF8", "gif")):
        if data.startswith(magic):
            return kind
    return "webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "other"


@dataclass(frozen=True)
class Answer:
    """What one prediction answered, as the record keeps it."""

    probability: float | None
    threshold: float | None
    decision: str | None
    refusal: str | None
    gate_score: float | None
    features: np.ndarray | None

    @classmethod
    def of(cls, prediction) -> Answer:
        reasons = ",".join(dict.fromkeys(r.check for r in prediction.population_reasons)) or None
        return cls(prediction.probability, prediction.threshold, prediction.label, reasons, prediction.ood_score,
                   prediction.features)


class CaseRecord:
    """The database of one app; safe to share between threads, and across a fork (each
    process makes its own engine on first use)."""

    def __init__(self, url: str):
        self.url = url
        self.problem: str | None = None  # why the last write failed; None while writes succeed
        self._engine = None
        self._pid: int | None = None
        self._migrated = False
        self._retry_after = 0.0
        self._lock = threading.Lock()
        #: Single answers written from several threads at once share one transaction (group commit):
        #: each durable commit costs a disk flush, which the threads then pay once between them.
        self._single_writes = Coalescer(self._insert_together, max_batch=32)

    # ---- the database ---------------------------------------------------------------

    @property
    def engine(self):
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._engine = make_engine(self.url)
                    self._pid = os.getpid()
        return self._engine

    def start(self) -> None:
        """Bring the schema up to date now; a database that cannot be reached leaves the record
        degraded, and the next write tries again."""
        try:
            self.migrate()
        except Exception as exc:  # noqa: BLE001 - any driver's failure: the app serves without its record
            self._failed(exc)

    def migrate(self) -> None:
        """Bring the schema to Alembic's head (one process at a time on PostgreSQL)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(70032)")  # servers starting together
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        self._migrated = True

    def _usable(self) -> bool:
        """False while the database failed recently (it is asked again after ``RETRY_S``)."""
        if self.problem is not None and time.monotonic() < self._retry_after:
            return False
        if not self._migrated:
            self.migrate()
        return True

    def _failed(self, exc: Exception) -> None:
        problem = f"the case record cannot be written ({type(exc).__name__})"
        if problem != self.problem:
            log.error("%s: %s", problem, str(exc).splitlines()[0][:200])
        self.problem = problem
        self._retry_after = time.monotonic() + RETRY_S

    def _succeeded(self) -> None:
        if self.problem is not None:
            log.info("the case record is written again")
        self.problem = None

    def health(self) -> str | None:
        """The record's problem, asked of the database again once ``RETRY_S`` has passed (so that
        /healthz clears when the database is back, before the next case is written)."""
        if self.problem is not None and time.monotonic() >= self._retry_after:
            try:
                self._usable()
                with self.engine.connect() as connection:
                    connection.exec_driver_sql("SELECT 1")
            except Exception as exc:  # noqa: BLE001 - any driver's failure keeps the record degraded
                self._failed(exc)
            else:
                self._succeeded()
        return self.problem

    # ---- writing --------------------------------------------------------------------

    def record(self, data: bytes, answer: Answer, model_version: str, source: str, age_years: float | None,
               user: str | None, study: StudyLink | None = None) -> str | None:
        """Append one case; its ``case_id``, or None when the database could not take it. Cases
        recorded on other threads meanwhile go to the database in the same transaction."""
        row = self._row(data, answer, model_version, source, age_years, user, study)
        try:
            if not self._usable():
                return None
            self._single_writes.submit(row)
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises, the answer stands
            self._failed(exc)
            return None
        self._succeeded()
        return row["case_id"]

    def record_many(self, films: list[tuple[bytes, Answer, StudyLink | None]], model_version: str, source: str,
                    age_years: float | None, user: str | None) -> list[str | None]:
        """Append one case a film, all in one transaction (a batch pays for one durable commit, not
        one a film); their ``case_id``s, or None for each when the database could not take them."""
        if not films:
            return []
        rows = [self._row(data, answer, model_version, source, age_years, user, study)
                for data, answer, study in films]
        try:
            if not self._usable():
                return [None] * len(rows)
            self._insert(rows)
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises, the answers stand
            self._failed(exc)
            return [None] * len(rows)
        self._succeeded()
        return [row["case_id"] for row in rows]

    def _insert_together(self, rows: list[dict]) -> list[Exception | None]:
        """``_insert``; where the group fails, each row again alone, so that one row's trouble (an
        instance the node recorded meanwhile, say) is its own caller's and not its neighbours'."""
        try:
            return self._insert(rows)
        except Exception:
            if len(rows) == 1:
                raise
        results: list[Exception | None] = []
        for row in rows:
            try:
                results += self._insert([row])
            except Exception as exc:  # noqa: BLE001 - raised in that row's caller alone
                results.append(exc)
        return results

    def _insert(self, rows: list[dict]) -> list[None]:
        """One statement and one commit for every row; a single row needs no BEGIN around it."""
        options = {"isolation_level": "AUTOCOMMIT"} if len(rows) == 1 else {}
        with self.engine.connect().execution_options(**options) as connection:
            connection.execute(Case.__table__.insert(), rows if len(rows) > 1 else rows[0])
            if len(rows) > 1:
                connection.commit()
        return [None] * len(rows)

    @staticmethod
    def _row(data: bytes, answer: Answer, model_version: str, source: str, age_years: float | None,
             user: str | None, study: StudyLink | None) -> dict:
        return {
            "case_id": secrets.token_urlsafe(16), "created_at": dt.datetime.now(dt.UTC),
            "model_version": model_version, "source": source, "file_kind": file_kind(data),
            "input_sha256": hashlib.sha256(data).hexdigest(), "probability": answer.probability,
            "threshold": answer.threshold, "decision": answer.decision, "refusal": answer.refusal,
            "gate_score": answer.gate_score, "age_years": age_years, "user": user,
            "features": None if answer.features is None else np.asarray(answer.features, np.float16).tobytes(),
            "overread": None, "study_uid": study and study.study_uid, "series_uid": study and study.series_uid,
            "sop_uid": study and study.sop_uid,
        }

    def add_overread(self, case_id: str, read: str, note: str | None, user: str | None) -> Case | None:
        """Keep a clinician's read of a case (a new row each time); None for an unknown case."""
        if read not in READS:
            raise ValueError(f"the read must be one of {', '.join(READS)}, not {read[:20]!r}")
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            case = session.scalar(select(Case).where(Case.case_id == case_id))
            if case is None:
                return None
            session.add(Overread(case_pk=case.id, read=read, note=(note or "").strip() or None, user=user,
                                 at=dt.datetime.now(dt.UTC)))
            case.overread = read
        return self.case(case_id)

    def prune(self, older_than_days: float) -> int:
        """Delete cases older than this (their overreads with them); how many went."""
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=older_than_days)
        with Session(self.engine) as session, session.begin():
            old = select(Case.id).where(Case.created_at < cutoff)
            session.execute(Overread.__table__.delete().where(Overread.case_pk.in_(old)))
            return session.execute(Case.__table__.delete().where(Case.created_at < cutoff)).rowcount

    # ---- reading --------------------------------------------------------------------

    def case(self, case_id: str) -> Case | None:
        query = (select(Case).where(Case.case_id == case_id)
                 .options(selectinload(Case.overreads), selectinload(Case.deliveries)))
        with Session(self.engine, expire_on_commit=False) as session:
            return session.scalar(query)  # its overreads loaded with it: pages read them after the session

    def count(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(Case))

    # ---- the DICOM node's outbox ----------------------------------------------------
    # These raise when the database cannot be reached: the node then withholds its
    # acknowledgement (the PACS sends the film again) or tries the delivery later.

    def case_of_instance(self, sop_uid: str) -> tuple[str, bool] | None:
        """(case_id, whether its report is in the outbox) of the film with this SOP Instance UID."""
        with Session(self.engine) as session:
            case = session.scalar(select(Case).where(Case.sop_uid == sop_uid).options(selectinload(Case.deliveries)))
            return None if case is None else (case.case_id, bool(case.deliveries))

    def add_delivery(self, case_id: str, sr_uid: str) -> None:
        now = dt.datetime.now(dt.UTC)
        with Session(self.engine) as session, session.begin():
            case_pk = session.scalar(select(Case.id).where(Case.case_id == case_id))
            session.add(Delivery(case_pk=case_pk, sr_uid=sr_uid, state="pending", attempts=0, created_at=now,
                                 next_at=now))

    def due_deliveries(self, limit: int = 20) -> list[Delivery]:
        query = (select(Delivery).where(Delivery.state == "pending", Delivery.next_at <= dt.datetime.now(dt.UTC))
                 .order_by(Delivery.next_at).limit(limit))
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(query))

    def delivery_done(self, delivery_id: int, state: str, error: str | None = None,
                      retry_at: dt.datetime | None = None) -> None:
        """``sent``; ``failed`` for good (the PACS refused it); or still ``pending``, to try at ``retry_at``."""
        if state not in DELIVERY_STATES:
            raise ValueError(state)
        now = dt.datetime.now(dt.UTC)
        values = {"state": state, "attempts": Delivery.attempts + 1, "last_error": error and error[:200],
                  "done_at": None if state == "pending" else now, "next_at": retry_at or now}
        with Session(self.engine) as session, session.begin():
            session.execute(Delivery.__table__.update().where(Delivery.id == delivery_id).values(**values))

    def delivery_figures(self) -> dict:
        with Session(self.engine) as session:
            return delivery_figures(session)


def delivery_figures(session) -> dict:
    """The DICOM node's outbox (every version): reports pending, failed for good, sent; the oldest waiting."""
    counts = dict(session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
    oldest = session.scalar(select(func.min(Delivery.created_at)).where(Delivery.state == "pending"))
    if oldest is not None and oldest.tzinfo is None:  # SQLite gives back naive UTC
        oldest = oldest.replace(tzinfo=dt.UTC)
    return {"pending": counts.get("pending", 0), "failed": counts.get("failed", 0), "sent": counts.get("sent", 0),
            "oldest_pending": oldest}


def make_engine(url: str, durable: bool = True):
    """SQLite in WAL mode, so readers never wait for the writer. A pooled connection is not
    checked before each use (that would cost every case a round trip): one that died in an
    outage fails its write, SQLAlchemy drops the pool's stale connections, and the next
    write after ``RETRY_S`` opens a fresh one.

    A case is on disk when its answer is given (``durable``): SQLite's ``synchronous=FULL``,
    PostgreSQL's own ``synchronous_commit``. It is an audit record, and the DICOM node tells
    the PACS a film is stored on the strength of it. ``durable=False`` (the relaxed settings
    kept before; a crash of the machine or the database server could lose the last cases)
    is for ``bench.cases``, which measures what durability costs."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 10})

        @event.listens_for(engine, "connect")
        def _sqlite_settings(connection, _):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    if url.startswith("postgresql"):
        arguments = {"connect_timeout": 3}
        if not durable:
            arguments["options"] = "-c synchronous_commit=off"
        return create_engine(url, pool_size=8, max_overflow=4, pool_timeout=5, connect_args=arguments)
    return create_engine(url)

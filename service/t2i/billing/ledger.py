"""The stardust ledger: keys, balances and reservations, one transaction per operation.

Money follows one path: `reserve` moves a price from a key's spendable balance into its
reserved total before a generation; afterwards exactly one of `commit` (the charge) or
`release` (the refund) resolves the reservation. The resolving UPDATE only matches an open
reservation, so a reservation can never be charged twice or charged after a release, and a
balance can never go negative (a conditional UPDATE plus a CHECK constraint). Every change is
journalled in `ledger_entries`; `verify()` recomputes all balances from the journal.

Every reservation operation (ReserveOp, CommitOp, ReleaseOp, idempotent or not) goes through
one path, `apply_batch`: the group committer hands it many ops in one transaction, and the
single-op methods `reserve`, `commit` and `release` are batches of one. Each op still succeeds
or fails on its own.

Methods are synchronous (SQLAlchemy Core); the interceptor runs them in worker threads.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from ..errors import AlreadyProcessing, InsufficientBalance, InternalError, InvalidArgument, NotFound, PermissionDenied
from . import apikeys
from .schema import api_keys, idempotency_records, instances, ledger_entries, reservations


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# The statements on the per-request path, built once: constructing SQLAlchemy expressions
# costs more CPU than running them, and every millisecond here is taken from generation.
_FIND_KEY = select(api_keys).where(api_keys.c.key_hash == bindparam("p_hash"))
_TAKE = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("p_key"), api_keys.c.revoked_at.is_(None), api_keys.c.balance >= bindparam("p_amount"))
    .values(balance=api_keys.c.balance - bindparam("p_amount"), reserved=api_keys.c.reserved + bindparam("p_amount"))
)
_RESOLVE_COMMITTED = (
    update(reservations)
    .where(reservations.c.id.in_(bindparam("p_reservations", expanding=True)), reservations.c.state == "open")
    .values(state="committed", resolved_at=bindparam("p_at"))
    .returning(reservations.c.id)
)
_CHARGE = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("p_key"))
    .values(reserved=api_keys.c.reserved - bindparam("p_amount"))
    .returning(api_keys.c.balance)
)
_INSERT_RESERVATION = insert(reservations)
_INSERT_ENTRY = insert(ledger_entries)


@dataclass(frozen=True)
class KeyRecord:
    id: str
    prefix: str
    name: str
    tier: str
    balance: int
    reserved: int
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class Reservation:
    id: str
    key_id: str
    amount: int


@dataclass(frozen=True)
class IdempotencyClaim:
    """An `idempotency-key` and the fingerprint of the request that came with it."""

    key: str
    fingerprint: str

    @staticmethod
    def fingerprint_of(method: str, payload: bytes) -> str:
        return hashlib.sha256(method.encode() + b"\0" + payload).hexdigest()


@dataclass(frozen=True)
class Replay:
    """A finished request with the same idempotency key: its stored response, not charged again."""

    response: bytes
    usage: int
    balance: int


class ReservationExpired(InternalError):
    """A commit found its reservation already resolved (the sweeper released it after its time
    to live): nothing was charged."""

    def __init__(self) -> None:
        super().__init__("the stardust reservation for this request expired before it finished; nothing was charged")


@dataclass
class ReserveOp:
    """Set `amount` aside for one request; with an idempotency claim, or answer its replay."""

    key_id: str
    amount: int
    owner: str
    model_id: int | None = None
    request_id: str | None = None
    idempotency: IdempotencyClaim | None = None
    # Seconds the reservation may stay open before the sweeper releases it (None: the ledger's
    # reservation_ttl). A job's lasts as long as it may queue and run (t2i.jobs).
    ttl: float | None = None
    # Chosen before the transaction, so that a reserve whose outcome was lost with the
    # connection (its COMMIT may have landed) can still be found and released by id.
    reservation_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class CommitOp:
    """Charge a reservation; `response` is stored for idempotent replays when given."""

    reservation: Reservation
    model_id: int | None = None
    request_id: str | None = None
    response: bytes | None = None


@dataclass
class ReleaseOp:
    """Give a reservation back (a no-op, answering False, if it is resolved already).

    `refund`: the release that follows a commit whose caller was not told it succeeded (the
    connection broke around its COMMIT, or the caller went away while it was being recorded),
    so the image was withheld. Had that commit landed, its charge is refunded, once, as a
    credit naming the reservation: nobody pays for an image they were not given."""

    reservation_id: str
    note: str = "request failed"
    refund: bool = False


Op = ReserveOp | CommitOp | ReleaseOp


class Ledger:
    def __init__(self, db: Engine, *, reservation_ttl: float = 1800, idempotency_ttl: float = 24 * 3600) -> None:
        self.db = db  # a SQLAlchemy Engine: the connection pool
        self.reservation_ttl = dt.timedelta(seconds=reservation_ttl)
        self.idempotency_ttl = dt.timedelta(seconds=idempotency_ttl)

    def close(self) -> None:
        """Close the pooled database connections."""
        self.db.dispose()

    def _read(self):
        """A read-only transaction, ended (not left open on a pooled connection) on exit."""
        return self.db.execution_options(read_only=True).begin()

    # --- keys --------------------------------------------------------------------------------

    def create_key(self, name: str, balance: int, tier: str) -> tuple[KeyRecord, str]:
        """A new key with an opening credit; returns the record and the key (shown only now)."""
        if balance < 0:
            raise InvalidArgument("balance", balance, "must be 0 or more")
        key, key_id, now = apikeys.new_key(), apikeys.new_key_id(), utcnow()
        with self.db.begin() as conn:
            conn.execute(
                insert(api_keys).values(
                    id=key_id, key_hash=apikeys.hash_key(key), key_prefix=apikeys.display_prefix(key), name=name,
                    tier=tier, balance=balance, reserved=0, created_at=now,
                )
            )
            if balance:
                self._journal(conn, key_id, "credit", balance, note="opening balance")
        return self.get_key(key_id), key

    def find_key(self, key: str) -> KeyRecord | None:
        with self._read() as conn:
            row = conn.execute(_FIND_KEY, {"p_hash": apikeys.hash_key(key)}).one_or_none()
        return _key(row) if row else None

    def get_key(self, key_id: str) -> KeyRecord:
        with self._read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
        if row is None:
            raise NotFound(f"API key {key_id} does not exist")
        return _key(row)

    def list_keys(self) -> list[KeyRecord]:
        with self._read() as conn:
            return [_key(row) for row in conn.execute(select(api_keys).order_by(api_keys.c.created_at))]

    def revoke(self, key_id: str) -> KeyRecord:
        with self.db.begin() as conn:
            result = conn.execute(
                update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)).values(revoked_at=utcnow())
            )
        record = self.get_key(key_id)
        if result.rowcount == 0 and not record.revoked:
            raise NotFound(f"API key {key_id} does not exist")
        return record

    def revoked_since(self, since: dt.datetime) -> list[str]:
        """Ids of the keys revoked at or after `since` (every replica polls this)."""
        with self._read() as conn:
            return list(conn.execute(select(api_keys.c.id).where(api_keys.c.revoked_at >= since)).scalars())

    def topup(self, key_id: str, amount: int, note: str = "top-up") -> KeyRecord:
        if amount <= 0:
            raise InvalidArgument("amount", amount, "must be a positive number of stardust")
        with self.db.begin() as conn:
            result = conn.execute(
                update(api_keys).where(api_keys.c.id == key_id).values(balance=api_keys.c.balance + amount)
            )
            if result.rowcount != 1:
                raise NotFound(f"API key {key_id} does not exist")
            self._journal(conn, key_id, "credit", amount, note=note)
        return self.get_key(key_id)

    def usage(self, key_id: str, limit: int = 50) -> tuple[KeyRecord, list[dict], dict[str, int]]:
        record = self.get_key(key_id)
        with self._read() as conn:
            entries = [
                dict(row._mapping)
                for row in conn.execute(
                    select(ledger_entries).where(ledger_entries.c.key_id == key_id).order_by(ledger_entries.c.id.desc()).limit(limit)
                )
            ]
            totals = {
                kind: int(total)
                for kind, total in conn.execute(
                    select(ledger_entries.c.kind, func.sum(ledger_entries.c.amount))
                    .where(ledger_entries.c.key_id == key_id)
                    .group_by(ledger_entries.c.kind)
                )
            }
        return record, entries, totals

    # --- reservations --------------------------------------------------------------------------

    def reserve(
        self, key_id: str, amount: int, *, owner: str, model_id: int | None = None, request_id: str | None = None,
        idempotency: IdempotencyClaim | None = None, ttl: float | None = None,
    ) -> Reservation | Replay:
        """Set `amount` aside for one request, or return the stored result of an idempotent retry."""
        return self._one(ReserveOp(key_id, amount, owner, model_id, request_id, idempotency, ttl))

    def commit(
        self, reservation: Reservation, *, model_id: int | None = None, request_id: str | None = None,
        idempotent_response: bytes | None = None,
    ) -> int:
        """Charge a reservation; returns the key's balance afterwards. ReservationExpired if it
        was already resolved (then nothing is charged)."""
        return self._one(CommitOp(reservation, model_id, request_id, idempotent_response))

    def commit_with(self, reservation: Reservation, then: Callable[[Connection, int], bool], *,
                    model_id: int | None = None, request_id: str | None = None) -> int | None:
        """Charge a reservation and, in the same transaction, `then(connection, balance)`: what
        was paid for is recorded with the payment, or neither is. `then` returning False rolls
        both back (None: nothing charged). ReservationExpired if the reservation was resolved."""
        now = utcnow()
        try:
            with self.db.begin() as conn:
                resolved = conn.execute(_RESOLVE_COMMITTED, {"p_reservations": [reservation.id], "p_at": now}).scalars().all()
                if reservation.id not in resolved:
                    raise ReservationExpired()
                balance = conn.execute(_CHARGE, {"p_key": reservation.key_id, "p_amount": reservation.amount}).scalar_one()
                conn.execute(_INSERT_ENTRY, [_entry(reservation.key_id, "commit", reservation.amount, reservation.id,
                                                    model_id, request_id, now)])
                if not then(conn, balance):
                    raise _RolledBack()
        except _RolledBack:
            return None
        return balance

    def release(self, reservation_id: str, note: str = "request failed") -> bool:
        """Return a reservation to the balance; False if it was already resolved."""
        return self._one(ReleaseOp(reservation_id, note))

    def _one(self, op: Op):
        (result,) = self.apply_batch([op])
        if isinstance(result, Exception):
            raise result
        return result

    def apply_batch(self, ops: list[Op]) -> list[Reservation | Replay | int | bool | Exception]:
        """Apply reserves, commits and releases in ONE transaction (group commit).

        Each op succeeds or fails on its own: the result list holds, per op, a Reservation or
        Replay (reserve), the key's balance after the batch (commit), True/False (release), or
        that op's error. Plain reserves are taken per key with one conditional UPDATE when the
        balance covers all of them (else one by one, in order); every commit of the batch is
        resolved by one UPDATE ... RETURNING; journal and reservation rows go in with one
        executemany each; one durable commit for everything. A database error raises: the
        caller (the group committer) decides whether to retry the ops one by one.
        """
        now = utcnow()
        results: list = [None] * len(ops)
        plain: dict[str, list[int]] = {}
        claimed, commits, releases = [], [], []
        for index, op in enumerate(ops):
            if isinstance(op, ReserveOp):
                if op.amount <= 0:
                    results[index] = ValueError(f"a reservation must be positive, got {op.amount}")
                elif op.idempotency is None:
                    plain.setdefault(op.key_id, []).append(index)
                else:
                    claimed.append(index)
            elif isinstance(op, CommitOp):
                commits.append(index)
            else:
                releases.append(index)
        rows, entries = [], []
        with self.db.begin() as conn:
            for index in claimed:
                results[index] = self._claimed_reserve(conn, ops[index], rows, entries, now)
            for key_id, indexes in plain.items():
                total = sum(ops[i].amount for i in indexes)
                if conn.execute(_TAKE, {"p_key": key_id, "p_amount": total}).rowcount == 1:
                    granted = indexes
                else:
                    granted = [i for i in indexes if conn.execute(_TAKE, {"p_key": key_id, "p_amount": ops[i].amount}).rowcount == 1]
                for i in granted:
                    results[i] = self._reserved(ops[i], rows, entries, now)
                for i in set(indexes) - set(granted):
                    results[i] = self._refusal(conn, ops[i].key_id, ops[i].amount)
            charged: dict[str, int] = {}
            if commits:
                ids = [ops[i].reservation.id for i in commits]
                resolved = set(conn.execute(_RESOLVE_COMMITTED, {"p_reservations": ids, "p_at": now}).scalars())
                for i in commits:
                    op, r = ops[i], ops[i].reservation
                    if r.id not in resolved:
                        results[i] = ReservationExpired()
                        continue
                    charged[r.key_id] = charged.get(r.key_id, 0) + r.amount
                    entries.append(_entry(r.key_id, "commit", r.amount, r.id, op.model_id, op.request_id, now))
            balances = {
                key_id: conn.execute(_CHARGE, {"p_key": key_id, "p_amount": amount}).scalar_one()
                for key_id, amount in charged.items()
            }
            for i in commits:
                if results[i] is None:
                    op = ops[i]
                    results[i] = balances[op.reservation.key_id]
                    if op.response is not None:
                        conn.execute(
                            update(idempotency_records)
                            .where(idempotency_records.c.reservation_id == op.reservation.id)
                            .values(state="done", response=op.response, usage=op.reservation.amount, balance=results[i])
                        )
            for i in releases:
                results[i] = self._release(conn, ops[i].reservation_id, ops[i].note, refund=ops[i].refund)
            if rows:
                conn.execute(_INSERT_RESERVATION, rows)
            if entries:
                conn.execute(_INSERT_ENTRY, entries)
        return results

    def _reserved(self, op: ReserveOp, rows: list, entries: list, now: dt.datetime) -> Reservation:
        reservation = Reservation(op.reservation_id, op.key_id, op.amount)
        rows.append({
            "id": reservation.id, "key_id": op.key_id, "amount": op.amount, "model_id": op.model_id,
            "request_id": op.request_id, "owner": op.owner, "state": "open", "created_at": now,
            "expires_at": now + (self.reservation_ttl if op.ttl is None else dt.timedelta(seconds=op.ttl)),
            "resolved_at": None,
        })
        entries.append(_entry(op.key_id, "reserve", op.amount, reservation.id, op.model_id, op.request_id, now))
        return reservation

    def _claimed_reserve(self, conn, op: ReserveOp, rows: list, entries: list, now: dt.datetime):
        """An idempotent reserve: the stored result, a refusal, or a new reservation. Runs in a
        savepoint so that a refused claim leaves no record behind for the rest of the batch."""
        try:
            with conn.begin_nested():
                replay = self._claim(conn, op.key_id, op.idempotency, op.reservation_id, now)
                if replay is not None:
                    return replay
                if conn.execute(_TAKE, {"p_key": op.key_id, "p_amount": op.amount}).rowcount != 1:
                    raise self._refusal(conn, op.key_id, op.amount)
        except IntegrityError:
            # Two requests inserted the same idempotency key at once; the other one won.
            return AlreadyProcessing(f"a request with idempotency key {op.idempotency.key!r} is already being processed")
        except (AlreadyProcessing, InvalidArgument, InsufficientBalance, NotFound, PermissionDenied) as refused:
            return refused
        return self._reserved(op, rows, entries, now)

    @staticmethod
    def _refusal(conn, key_id: str, amount: int) -> Exception:
        """Why a reserve could not take its amount: the one place that classifies refusals."""
        row = conn.execute(select(api_keys.c.balance, api_keys.c.revoked_at).where(api_keys.c.id == key_id)).one_or_none()
        if row is None:
            return NotFound(f"API key {key_id} does not exist")
        if row.revoked_at is not None:
            return PermissionDenied(f"API key {key_id} has been revoked")
        return InsufficientBalance(amount, row.balance)

    def _release(self, conn, reservation_id: str, note: str, *, refund: bool = False) -> bool:
        row = conn.execute(select(reservations).where(reservations.c.id == reservation_id)).one_or_none()
        if row is None:
            return False
        if refund and row.state == "committed":
            return self._refund(conn, row)
        resolved = conn.execute(
            update(reservations)
            .where(reservations.c.id == reservation_id, reservations.c.state == "open")
            .values(state="released", resolved_at=utcnow())
        ).rowcount
        if resolved != 1:
            return False
        conn.execute(
            update(api_keys)
            .where(api_keys.c.id == row.key_id)
            .values(balance=api_keys.c.balance + row.amount, reserved=api_keys.c.reserved - row.amount)
        )
        self._journal(conn, row.key_id, "release", row.amount, reservation_id, row.model_id, row.request_id, note)
        conn.execute(
            update(idempotency_records).where(idempotency_records.c.reservation_id == reservation_id).values(state="failed")
        )
        return True

    def _refund(self, conn, row) -> bool:
        """Give back a commit whose image was withheld; once (a retried release finds the
        credit already there and answers False)."""
        refunded = conn.execute(
            select(func.count()).select_from(ledger_entries)
            .where(ledger_entries.c.reservation_id == row.id, ledger_entries.c.kind == "credit")
        ).scalar_one()
        if refunded:
            return False
        conn.execute(update(api_keys).where(api_keys.c.id == row.key_id).values(balance=api_keys.c.balance + row.amount))
        self._journal(conn, row.key_id, "credit", row.amount, row.id, row.model_id, row.request_id,
                      "refund: the charge was recorded but its image was withheld")
        # Not paid for, so not replayed either: a retry with its idempotency key runs again.
        conn.execute(
            update(idempotency_records).where(idempotency_records.c.reservation_id == row.id)
            .values(state="failed", response=None, usage=None, balance=None)
        )
        return True

    def open_reservations(self) -> list[dict]:
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(select(reservations).where(reservations.c.state == "open"))]

    # --- idempotency ---------------------------------------------------------------------------

    def _claim(self, conn, key_id: str, claim: IdempotencyClaim, reservation_id: str, now: dt.datetime) -> Replay | None:
        where = and_(idempotency_records.c.key_id == key_id, idempotency_records.c.idempotency_key == claim.key)
        row = conn.execute(select(idempotency_records).where(where)).one_or_none()
        if row is not None and _aware(row.created_at) < now - self.idempotency_ttl:
            conn.execute(delete(idempotency_records).where(where))
            row = None
        if row is None:
            conn.execute(
                insert(idempotency_records).values(
                    key_id=key_id, idempotency_key=claim.key, fingerprint=claim.fingerprint, state="running",
                    reservation_id=reservation_id, created_at=now,
                )
            )
            return None
        if row.fingerprint != claim.fingerprint:
            raise InvalidArgument(
                "idempotency-key", claim.key, "was already used with different request parameters; use a new key for a new request"
            )
        if row.state == "running":
            raise AlreadyProcessing(
                f"a request with idempotency key {claim.key!r} is still being processed; retry after it finishes"
            )
        if row.state == "done":
            return Replay(response=row.response or b"", usage=row.usage or 0, balance=row.balance or 0)
        # The earlier attempt failed and was not charged: this retry runs it again.
        conn.execute(update(idempotency_records).where(where).values(state="running", reservation_id=reservation_id))
        return None

    # --- crash recovery ------------------------------------------------------------------------

    def heartbeat(self, owner: str, started_at: dt.datetime) -> None:
        now = utcnow()
        with self.db.begin() as conn:
            updated = conn.execute(update(instances).where(instances.c.id == owner).values(heartbeat_at=now)).rowcount
            if not updated:
                conn.execute(insert(instances).values(id=owner, started_at=started_at, heartbeat_at=now))

    def sweep(self, owner: str, started_at: dt.datetime, instance_timeout: float) -> int:
        """Release reservations nobody will resolve: left by an earlier run of this instance,
        held by an instance that stopped heartbeating, or past their expiry. Also forgets
        idempotency records older than their time to live."""
        now = utcnow()
        stale = now - dt.timedelta(seconds=instance_timeout)
        with self._read() as conn:
            dead_owners = select(instances.c.id).where(instances.c.heartbeat_at < stale)
            ids = conn.execute(
                select(reservations.c.id).where(
                    reservations.c.state == "open",
                    or_(
                        and_(reservations.c.owner == owner, reservations.c.created_at < started_at),
                        reservations.c.owner.in_(dead_owners),
                        reservations.c.expires_at < now,
                    ),
                )
            ).scalars().all()
        released = 0
        for reservation_id in ids:
            with self.db.begin() as conn:
                released += self._release(conn, reservation_id, "released after its server stopped")
        with self.db.begin() as conn:
            conn.execute(
                delete(idempotency_records).where(
                    idempotency_records.c.created_at < now - self.idempotency_ttl, idempotency_records.c.state != "running"
                )
            )
            conn.execute(delete(instances).where(instances.c.heartbeat_at < now - dt.timedelta(days=7)))
        return released

    # --- audit ---------------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Recompute every key's balance and reserved total from the journal; list mismatches."""
        problems = []
        with self._read() as conn:
            sums: dict[str, dict[str, int]] = {}
            for key_id, kind, total in conn.execute(
                select(ledger_entries.c.key_id, ledger_entries.c.kind, func.sum(ledger_entries.c.amount)).group_by(
                    ledger_entries.c.key_id, ledger_entries.c.kind
                )
            ):
                sums.setdefault(key_id, {})[kind] = int(total)
            open_sums = dict(
                conn.execute(
                    select(reservations.c.key_id, func.sum(reservations.c.amount))
                    .where(reservations.c.state == "open")
                    .group_by(reservations.c.key_id)
                ).all()
            )
            for row in conn.execute(select(api_keys)):
                s = sums.get(row.id, {})
                balance = s.get("credit", 0) - s.get("reserve", 0) + s.get("release", 0)
                reserved = s.get("reserve", 0) - s.get("commit", 0) - s.get("release", 0)
                if balance != row.balance:
                    problems.append(f"{row.id}: stored balance {row.balance}, journal says {balance}")
                if reserved != row.reserved:
                    problems.append(f"{row.id}: stored reserved {row.reserved}, journal says {reserved}")
                if int(open_sums.get(row.id, 0)) != row.reserved:
                    problems.append(f"{row.id}: open reservations sum to {open_sums.get(row.id, 0)}, reserved is {row.reserved}")
                if row.balance < 0 or row.reserved < 0:
                    problems.append(f"{row.id}: negative balance {row.balance} or reserved {row.reserved}")
            # Each resolved reservation has exactly one resolving journal entry.
            for reservation_id, count in conn.execute(
                select(ledger_entries.c.reservation_id, func.count())
                .where(ledger_entries.c.kind.in_(("commit", "release")))
                .group_by(ledger_entries.c.reservation_id)
                .having(func.count() > 1)
            ):
                problems.append(f"reservation {reservation_id} was resolved {count} times")
            # A refund (a credit naming a reservation) gives back one commit, once.
            commits = select(ledger_entries.c.reservation_id).where(ledger_entries.c.kind == "commit")
            for reservation_id, count in conn.execute(
                select(ledger_entries.c.reservation_id, func.count())
                .where(ledger_entries.c.kind == "credit", ledger_entries.c.reservation_id.is_not(None))
                .group_by(ledger_entries.c.reservation_id)
            ):
                if count > 1:
                    problems.append(f"reservation {reservation_id} was refunded {count} times")
            for (reservation_id,) in conn.execute(
                select(ledger_entries.c.reservation_id).where(
                    ledger_entries.c.kind == "credit", ledger_entries.c.reservation_id.is_not(None),
                    ledger_entries.c.reservation_id.not_in(commits),
                )
            ):
                problems.append(f"reservation {reservation_id} was refunded without a commit")
        return problems

    def _journal(self, conn, key_id, kind, amount, reservation_id=None, model_id=None, request_id=None, note=None) -> None:
        conn.execute(_INSERT_ENTRY, _entry(key_id, kind, amount, reservation_id, model_id, request_id, utcnow(), note))


class _RolledBack(Exception):
    """commit_with's `then` declined: undo the charge with it."""


def _entry(key_id, kind, amount, reservation_id, model_id, request_id, now, note=None) -> dict:
    return {
        "key_id": key_id, "kind": kind, "amount": amount, "reservation_id": reservation_id, "model_id": model_id,
        "request_id": request_id, "note": note, "created_at": now,
    }


def _aware(value: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _key(row) -> KeyRecord:
    return KeyRecord(
        id=row.id, prefix=row.key_prefix, name=row.name, tier=row.tier, balance=row.balance, reserved=row.reserved,
        created_at=_aware(row.created_at), revoked_at=_aware(row.revoked_at) if row.revoked_at else None,
    )

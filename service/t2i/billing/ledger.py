"""The stardust ledger: keys, balances and reservations, one transaction per operation.

Money follows one path: `reserve` moves a price from a key's spendable balance into its
reserved total before a generation; afterwards exactly one of `commit` (the charge) or
`release` (the refund) resolves the reservation. The resolving UPDATE only matches an open
reservation, so a reservation can never be charged twice or charged after a release, and a
balance can never go negative (a conditional UPDATE plus a CHECK constraint). Every change is
journalled in `ledger_entries`; `verify()` recomputes all balances from the journal.

Methods are synchronous (SQLAlchemy Core); the interceptor runs them in worker threads.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from dataclasses import dataclass

from sqlalchemy import Engine, and_, bindparam, delete, func, insert, or_, select, update
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
_RESOLVE = (
    update(reservations)
    .where(reservations.c.id == bindparam("p_reservation"), reservations.c.state == "open")
    .values(state=bindparam("p_state"), resolved_at=bindparam("p_at"))
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


@dataclass
class ReserveOp:
    """A reservation without an idempotency key, to be applied in a batch."""

    key_id: str
    amount: int
    owner: str
    model_id: int | None = None
    request_id: str | None = None


@dataclass
class CommitOp:
    """A charge of a reservation whose response need not be stored, to be applied in a batch."""

    reservation: Reservation
    model_id: int | None = None
    request_id: str | None = None


class Ledger:
    def __init__(self, engine: Engine, *, reservation_ttl: float = 1800, idempotency_ttl: float = 24 * 3600) -> None:
        self.engine = engine
        self.reservation_ttl = dt.timedelta(seconds=reservation_ttl)
        self.idempotency_ttl = dt.timedelta(seconds=idempotency_ttl)

    def _read(self):
        """A read-only transaction, ended (not left open on a pooled connection) on exit."""
        return self.engine.execution_options(read_only=True).begin()

    # --- keys --------------------------------------------------------------------------------

    def create_key(self, name: str, balance: int, tier: str) -> tuple[KeyRecord, str]:
        """A new key with an opening credit; returns the record and the key (shown only now)."""
        if balance < 0:
            raise InvalidArgument("balance", balance, "must be 0 or more")
        key, key_id, now = apikeys.new_key(), apikeys.new_key_id(), utcnow()
        with self.engine.begin() as conn:
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
        with self.engine.begin() as conn:
            result = conn.execute(
                update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)).values(revoked_at=utcnow())
            )
        record = self.get_key(key_id)
        if result.rowcount == 0 and not record.revoked:
            raise NotFound(f"API key {key_id} does not exist")
        return record

    def topup(self, key_id: str, amount: int, note: str = "top-up") -> KeyRecord:
        if amount <= 0:
            raise InvalidArgument("amount", amount, "must be a positive number of stardust")
        with self.engine.begin() as conn:
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
        idempotency: IdempotencyClaim | None = None,
    ) -> Reservation | Replay:
        """Set `amount` aside for one request, or return the stored result of an idempotent retry."""
        if amount <= 0:
            raise ValueError(f"a reservation must be positive, got {amount}")
        now = utcnow()
        reservation_id = str(uuid.uuid4())
        try:
            with self.engine.begin() as conn:
                if idempotency is not None:
                    replay = self._claim(conn, key_id, idempotency, reservation_id, now)
                    if replay is not None:
                        return replay
                moved = conn.execute(_TAKE, {"p_key": key_id, "p_amount": amount}).rowcount
                if moved != 1:
                    row = conn.execute(select(api_keys.c.balance, api_keys.c.revoked_at).where(api_keys.c.id == key_id)).one_or_none()
                    if row is None:
                        raise NotFound(f"API key {key_id} does not exist")
                    if row.revoked_at is not None:
                        raise PermissionDenied(f"API key {key_id} has been revoked")
                    raise InsufficientBalance(amount, row.balance)
                conn.execute(
                    _INSERT_RESERVATION,
                    {
                        "id": reservation_id, "key_id": key_id, "amount": amount, "model_id": model_id,
                        "request_id": request_id, "owner": owner, "state": "open", "created_at": now,
                        "expires_at": now + self.reservation_ttl, "resolved_at": None,
                    },
                )
                self._journal(conn, key_id, "reserve", amount, reservation_id, model_id, request_id)
        except IntegrityError:
            if idempotency is None:
                raise
            # Two requests inserted the same idempotency key at once; the other one won.
            raise AlreadyProcessing(f"a request with idempotency key {idempotency.key!r} is already being processed") from None
        return Reservation(reservation_id, key_id, amount)

    def commit(
        self, reservation: Reservation, *, model_id: int | None = None, request_id: str | None = None,
        idempotent_response: bytes | None = None,
    ) -> int:
        """Charge a reservation; returns the key's balance afterwards. Raises if it was already
        resolved (then nothing is charged)."""
        with self.engine.begin() as conn:
            resolved = conn.execute(
                _RESOLVE, {"p_reservation": reservation.id, "p_state": "committed", "p_at": utcnow()}
            ).rowcount
            if resolved != 1:
                raise InternalError("the stardust reservation for this request expired before it finished; nothing was charged")
            balance = conn.execute(_CHARGE, {"p_key": reservation.key_id, "p_amount": reservation.amount}).scalar_one()
            self._journal(conn, reservation.key_id, "commit", reservation.amount, reservation.id, model_id, request_id)
            if idempotent_response is not None:
                conn.execute(
                    update(idempotency_records)
                    .where(idempotency_records.c.reservation_id == reservation.id)
                    .values(state="done", response=idempotent_response, usage=reservation.amount, balance=balance)
                )
        return balance

    def apply_batch(self, ops: list[ReserveOp | CommitOp]) -> list[Reservation | int | Exception]:
        """Apply many reserves and commits in ONE transaction (group commit).

        Each op still succeeds or fails on its own: the result list holds a Reservation
        (reserve), the key's balance after the batch (commit), or that op's error. The
        statements are per key, not per op: one conditional UPDATE takes all of a key's
        reserves when its balance covers them (else they are tried one by one, in order), one
        UPDATE ... RETURNING resolves every commit of the batch, and the journal and
        reservation rows go in with one executemany each; one durable commit for everything.
        """
        now = utcnow()
        results: list[Reservation | int | Exception | None] = [None] * len(ops)
        reserves: dict[str, list[int]] = {}
        commits: list[int] = []
        for index, op in enumerate(ops):
            if isinstance(op, ReserveOp):
                reserves.setdefault(op.key_id, []).append(index)
            else:
                commits.append(index)
        reservation_rows, entries = [], []
        with self.engine.begin() as conn:
            for key_id, indexes in reserves.items():
                total = sum(ops[i].amount for i in indexes)
                if conn.execute(_TAKE, {"p_key": key_id, "p_amount": total}).rowcount == 1:
                    granted = indexes
                else:
                    granted = [i for i in indexes if conn.execute(_TAKE, {"p_key": key_id, "p_amount": ops[i].amount}).rowcount == 1]
                for i in granted:
                    op = ops[i]
                    reservation = Reservation(str(uuid.uuid4()), op.key_id, op.amount)
                    reservation_rows.append({
                        "id": reservation.id, "key_id": op.key_id, "amount": op.amount, "model_id": op.model_id,
                        "request_id": op.request_id, "owner": op.owner, "state": "open", "created_at": now,
                        "expires_at": now + self.reservation_ttl, "resolved_at": None,
                    })
                    entries.append(_entry(op.key_id, "reserve", op.amount, reservation.id, op.model_id, op.request_id, now))
                    results[i] = reservation
            charged: dict[str, int] = {}
            if commits:
                ids = [ops[i].reservation.id for i in commits]
                resolved = set(conn.execute(_RESOLVE_COMMITTED, {"p_reservations": ids, "p_at": now}).scalars())
                for i in commits:
                    op = ops[i]
                    r = op.reservation
                    if r.id not in resolved:
                        results[i] = InternalError(
                            "the stardust reservation for this request expired before it finished; nothing was charged"
                        )
                        continue
                    charged[r.key_id] = charged.get(r.key_id, 0) + r.amount
                    entries.append(_entry(r.key_id, "commit", r.amount, r.id, op.model_id, op.request_id, now))
            balances = {
                key_id: conn.execute(_CHARGE, {"p_key": key_id, "p_amount": amount}).scalar_one()
                for key_id, amount in charged.items()
            }
            if reservation_rows:
                conn.execute(_INSERT_RESERVATION, reservation_rows)
            if entries:
                conn.execute(_INSERT_ENTRY, entries)
        for index, op in enumerate(ops):
            if results[index] is None and isinstance(op, CommitOp):
                results[index] = balances[op.reservation.key_id]
            elif results[index] is None:
                results[index] = self._refusal(op.key_id, op.amount)
        return results

    def _refusal(self, key_id: str, amount: int) -> Exception:
        with self._read() as conn:
            row = conn.execute(select(api_keys.c.balance, api_keys.c.revoked_at).where(api_keys.c.id == key_id)).one_or_none()
        if row is None:
            return NotFound(f"API key {key_id} does not exist")
        if row.revoked_at is not None:
            return PermissionDenied(f"API key {key_id} has been revoked")
        return InsufficientBalance(amount, row.balance)

    def release(self, reservation_id: str, note: str = "request failed") -> bool:
        """Return a reservation to the balance; False if it was already resolved."""
        with self.engine.begin() as conn:
            return self._release(conn, reservation_id, note)

    def _release(self, conn, reservation_id: str, note: str) -> bool:
        row = conn.execute(select(reservations).where(reservations.c.id == reservation_id)).one_or_none()
        if row is None:
            return False
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
        with self.engine.begin() as conn:
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
            with self.engine.begin() as conn:
                released += self._release(conn, reservation_id, "released after its server stopped")
        with self.engine.begin() as conn:
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
        return problems

    def _journal(self, conn, key_id, kind, amount, reservation_id=None, model_id=None, request_id=None, note=None) -> None:
        conn.execute(_INSERT_ENTRY, _entry(key_id, kind, amount, reservation_id, model_id, request_id, utcnow(), note))


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

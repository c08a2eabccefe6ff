"""Cost per message as the store grows: the real receive + process path timed with 1,000, 10,000
and 100,000 messages already stored, on SQLite and PostgreSQL.

    .venv/bin/python bench/growth_bench.py [--sizes 1000,10000,100000] [--measure 300]
        [--turns 6] [--seed 1] [--pg-url URL] [--pg-max-size 100000] [--no-sqlite] [--no-pg]

A seeded generator writes realistic mail (Japanese in UTF-8 and ISO-2022-JP, English, HTML,
answering-service and contact-form templates, FAX and mail attachments, about 30 % replies by
In-Reply-To/References or by `[INQ-n]` in the subject, re-deliveries, auto-replies; 30 KB on
average). One store per size is filled by bulk inserts straight into the tables (ledger rows with
their fates and raw bytes, tickets, comments, attachments and blobs, attempts; the tracker has
closed all but the newest 150 tickets). Then each store takes `--measure` new mails from the same
stream (replies reference threads anywhere in the store) through `receive` and `process`, one by
one, routed by the project's rules.yaml and templates.yaml. The stores are measured in turns, so
that other load on the machine falls on every size alike. PostgreSQL gets VACUUM ANALYZE after
the fill, as autovacuum would; SQLite gets no statistics, as in production.

Printed per backend and size: mean, median and 95th percentile time per message, messages per
second, this process's CPU (user + system, and system alone) per message (SQLite's writes happen
in this process, PostgreSQL's in the server), the reply lookup (`repo.ticket_for_message_ids`)
alone, and the mean and median against the smallest store's: the cost is flat while they stay
within 1.20. Also runs on the schema before migration 0005 (raw bytes in the ledger row), to
compare. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, bindparam, create_engine, insert, text, update
from sqlalchemy.orm import Session, sessionmaker

from config import Settings, load_settings
from ingest.headers import identity_of
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process
from rules.engine import RulesRouter
from rules.load import load_rules
from storage import db, models, repo
from storage.models import (
    Attachment,
    AttachmentBlob,
    InboundMessage,
    ProcessingAttempt,
    Ticket,
    TicketComment,
)

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = "wine-importer.example.jp"
TEAM = ["suzuki", "takahashi", "yamada"]
OPEN_TICKETS = 150  # the tracker has closed every older ticket
START = datetime(2026, 1, 5, tzinfo=UTC)

PRODUCTS = ["ボルドー赤 2019", "シャブリ 2021", "キャンティ 2020", "リオハ 2018", "モーゼル 2022"]
COMPANIES = ["㈱髙島屋ワイン", "有限会社さくら酒店", "株式会社ヴィノ", "丸井商事㈱", "酒のやまだ"]
NAMES = ["鈴木 一郎", "佐藤 花子", "髙橋 美咲", "田中 太郎", "渡辺 健", "伊藤 さくら"]
JA_LINES = [
    "いつもお世話になっております。",
    "{product}の在庫はございますか。",
    "{n}本の購入を検討しております。",
    "納期とお見積りをお知らせください。",
    "先日届いた商品について確認させてください。",
    "請求書の送付先が変更になりましたのでご連絡いたします。",
    "①②③の３点について、ご回答をお願いいたします。",
    "よろしくお願いいたします。",
]
EN_LINES = [
    "Could you tell us whether {product} is available?",
    "We would like to order {n} cases for our restaurant.",
    "Please send the price list and the delivery schedule.",
    "Best regards,",
]
JIS_SAFE = str.maketrans({"㈱": "(株)", "髙": "高", "①": "1", "②": "2", "③": "3"})
# (kind, weight): replies are about 30 % of intake, as in the issue.
KINDS = [
    ("inquiry-utf8", 25),
    ("inquiry-jis", 8),
    ("inquiry-en", 7),
    ("html", 5),
    ("webform", 8),
    ("phone", 7),
    ("fax", 5),
    ("attachment", 5),
    ("reply", 24),
    ("reply-key", 4),
    ("redelivery", 1),
    ("auto-reply", 1),
]


def b64_lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def encoded_word(value: str) -> str:
    return f"=?UTF-8?B?{base64.b64encode(value.encode()).decode()}?="


@dataclass
class Mail:
    """One generated mail and what storing it made (for the bulk fill)."""

    raw: bytes
    kind: str
    message_id: str
    subject: str
    sender: str
    text: str
    thread: Thread | None = None  # for replies and re-deliveries: the thread it belongs to
    original: Mail | None = None  # for re-deliveries
    attachments: list[tuple[str, str, bytes]] = field(default_factory=list)


@dataclass
class Thread:
    """A ticket's conversation: what a reply quotes, and the Message-IDs so far, oldest first."""

    subject: str
    sender: str
    quote: str
    message_ids: list[str]
    ticket_number: int = 0  # known once stored


class Corpus:
    """A seeded stream of mails; replies and re-deliveries refer to what came before."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.count = 0
        self.threads: list[Thread] = []
        self.mails: list[Mail] = []  # recent first deliveries, for re-deliveries
        self.kinds, self.weights = zip(*KINDS, strict=True)
        # Attachment contents: a pool, as the same logos, order forms and scans recur.
        self.payloads = [
            self.rng.randbytes(self.rng.choice([20_000, 60_000, 150_000, 300_000, 400_000]))
            for _ in range(48)
        ]

    def next(self) -> Mail:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        if kind in ("reply", "reply-key", "redelivery") and len(self.threads) < 10:
            kind = "inquiry-utf8"
        self.count += 1
        mail = getattr(self, "_" + kind.replace("-", "_"))()
        mail.kind = kind
        if mail.thread is None and kind not in ("auto-reply",) and mail.original is None:
            quote = "\n".join("> " + line for line in mail.text.splitlines()[:20])
            self.threads.append(Thread(mail.subject, mail.sender, quote, [mail.message_id]))
            self.mails.append(mail)
            self.mails = self.mails[-2000:]
        return mail

    # --- pieces ---------------------------------------------------------------------------

    def _date(self) -> str:
        moment = START + timedelta(minutes=self.count * 3)
        return moment.strftime("%a, %d %b %Y %H:%M:%S +0000")

    def _mid(self, host: str = "mail.example.com") -> str:
        return f"<{self.count}.{self.rng.getrandbits(48):012x}@{host}>"

    def _ja_text(self, lines: int) -> str:
        rng = self.rng
        chosen = [rng.choice(JA_LINES) for _ in range(lines)]
        body = "\n".join(
            line.format(product=rng.choice(PRODUCTS), n=rng.randint(2, 48)) for line in chosen
        )
        return f"{rng.choice(COMPANIES)}\n{rng.choice(NAMES)}です。\n\n{body}\n"

    def _sender(self) -> str:
        return f"customer{self.rng.randint(1, 5000)}@shop{self.rng.randint(1, 400)}.example.jp"

    def _headers(self, sender: str, subject: str, mid: str, extra: str = "") -> str:
        return (
            f"Received: from mx.example.net (mx.example.net [192.0.2.{self.rng.randint(1, 250)}])"
            f"\r\n\tby mail.{DOMAIN} with ESMTPS; {self._date()}\r\n"
            f"From: {sender}\r\nTo: inquiry@{DOMAIN}\r\nSubject: {encoded_word(subject)}\r\n"
            f"Date: {self._date()}\r\nMessage-ID: {mid}\r\nMIME-Version: 1.0\r\n{extra}"
        )

    def _plain(self, sender: str, subject: str, text: str, extra: str = "") -> Mail:
        mid = self._mid()
        head = self._headers(sender, subject, mid, extra)
        raw = (
            f"{head}Content-Type: text/plain; charset=UTF-8\r\n"
            f"Content-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode() + text.replace("\n", "\r\n").encode()
        return Mail(raw, "", mid, subject, sender, text)

    def _with_attachments(
        self, sender: str, subject: str, text: str, files: list[tuple[str, str, bytes]]
    ) -> Mail:
        mid = self._mid()
        boundary = f"b{self.rng.getrandbits(64):016x}"
        parts = [
            f"--{boundary}\r\nContent-Type: text/plain; charset=UTF-8\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n".encode()
            + b64_lines(text.encode())
        ]
        for name, ctype, content in files:
            parts.append(
                (
                    f"--{boundary}\r\nContent-Type: {ctype}\r\nContent-Disposition: attachment;"
                    f' filename="{encoded_word(name)}"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
                ).encode()
                + b64_lines(content)
            )
        head = self._headers(sender, subject, mid)
        raw = (
            f'{head}Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'.encode()
            + b"\r\n".join(parts)
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return Mail(raw, "", mid, subject, sender, text, attachments=files)

    # --- kinds ------------------------------------------------------------------------------

    def _inquiry_utf8(self) -> Mail:
        rng = self.rng
        subject = (
            f"{rng.choice(PRODUCTS)}の{rng.choice(['在庫', '納期', '価格', 'ご注文'])}について"
        )
        if rng.random() < 0.05:
            subject = "【至急】" + subject
        return self._plain(self._sender(), subject, self._ja_text(rng.randint(4, 40)))

    def _inquiry_jis(self) -> Mail:
        rng = self.rng
        subject = f"{rng.choice(PRODUCTS)}のお問い合わせ"
        # Plain ISO-2022-JP has no ㈱, 髙 or ①: mailers that write them use CP50221.
        text = self._ja_text(rng.randint(4, 30)).translate(JIS_SAFE)
        sender, mid = self._sender(), self._mid()
        encoded = base64.b64encode(subject.encode("iso-2022-jp")).decode()
        head = self._headers(sender, subject, mid).replace(
            f"Subject: {encoded_word(subject)}", f"Subject: =?ISO-2022-JP?B?{encoded}?="
        )
        raw = (
            f"{head}Content-Type: text/plain; charset=ISO-2022-JP\r\n"
            "Content-Transfer-Encoding: 7bit\r\n\r\n"
        ).encode() + text.replace("\n", "\r\n").encode("iso-2022-jp")
        return Mail(raw, "", mid, subject, sender, text)

    def _inquiry_en(self) -> Mail:
        rng = self.rng
        lines = [
            rng.choice(EN_LINES).format(product=rng.choice(PRODUCTS), n=rng.randint(2, 40))
            for _ in range(rng.randint(3, 30))
        ]
        return self._plain(
            f"buyer{rng.randint(1, 900)}@example.com", "Availability", "\n".join(lines)
        )

    def _html(self) -> Mail:
        text = self._ja_text(self.rng.randint(4, 30))
        html = "<html><body>" + "".join(f"<p>{line}</p>" for line in text.splitlines()) + "</body>"
        mid, sender, subject = self._mid(), self._sender(), "ご注文の確認"
        boundary = f"a{self.rng.getrandbits(64):016x}"
        raw = (
            f'{self._headers(sender, subject, mid)}Content-Type: multipart/alternative; boundary="'
            f'{boundary}"\r\n\r\n--{boundary}\r\nContent-Type: text/plain; charset=UTF-8\r\n'
            f"Content-Transfer-Encoding: 8bit\r\n\r\n{text}\r\n--{boundary}\r\n"
            "Content-Type: text/html; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            f"{html}\r\n--{boundary}--\r\n"
        ).encode()
        return Mail(raw, "", mid, subject, sender, text)

    def _webform(self) -> Mail:
        rng = self.rng
        text = (
            f"お名前: {rng.choice(NAMES)}\n会社名: {rng.choice(COMPANIES)}\n"
            f"メールアドレス: {self._sender()}\n電話番号: 03-{rng.randint(1000, 9999)}-"
            f"{rng.randint(1000, 9999)}\nお問い合わせ種別: 在庫確認\nお問い合わせ内容:\n"
            f"{self._ja_text(rng.randint(2, 10))}\n-- \nこのメールは ワイン輸入 "
            f"(https://{DOMAIN}) のお問い合わせフォームから送信されました\n"
        )
        return self._plain(f"wordpress@{DOMAIN}", "[ワイン輸入] お問い合わせ", text)

    def _phone(self) -> Mail:
        rng = self.rng
        text = (
            f"受付日時：2026年11月{rng.randint(1, 28)}日 10:{rng.randint(10, 59)}\n"
            f"会社名：{rng.choice(COMPANIES)}\nお名前：{rng.choice(NAMES)} 様\n"
            f"電話番号：03-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}\n"
            f"ご用件：{rng.choice(PRODUCTS)}について折り返しお電話ください。\n"
            f"受付番号：TEL-{self.count}\n"
        )
        return self._plain(
            "uketsuke@denwa-daiko.example.com", f"【電話受付】{rng.choice(COMPANIES)}様より", text
        )

    def _fax(self) -> Mail:
        rng = self.rng
        pages = rng.randint(1, 6)
        ctype, name = rng.choice([("application/pdf", "FAX.pdf"), ("image/tiff", "FAX.tif")])
        return self._with_attachments(
            "FAX Gateway <noreply@faxgw.example.net>",
            f"FAX受信 送信元:03-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}"
            f" ({pages}ページ)",
            f"FAXを受信しました。\nページ数: {pages}\n",
            [(name, ctype, rng.choice(self.payloads))],
        )

    def _attachment(self) -> Mail:
        rng = self.rng
        files = [
            (rng.choice(["注文書.pdf", "見積依頼.xlsx", "写真.jpg"]), "application/octet-stream", p)
            for p in rng.sample(self.payloads, rng.randint(1, 2))
        ]
        return self._with_attachments(
            self._sender(), "注文書の送付", self._ja_text(rng.randint(3, 12)), files
        )

    def _thread(self) -> Thread:
        # Half of the replies continue a recent conversation, half an old one.
        pool = self.threads[-500:] if self.rng.random() < 0.5 else self.threads
        return self.rng.choice(pool)

    def _reply(self) -> Mail:
        thread = self._thread()
        refs = thread.message_ids[-10:]
        text = self._ja_text(self.rng.randint(2, 8)) + "\n" + thread.quote
        mail = self._plain(
            thread.sender,
            "Re: " + thread.subject,
            text,
            f"In-Reply-To: {refs[-1]}\r\nReferences: {' '.join(refs)}\r\n",
        )
        mail.thread = thread
        thread.message_ids.append(mail.message_id)
        return mail

    def _reply_key(self) -> Mail:
        thread = self._thread()
        subject = f"Re: [INQ-{thread.ticket_number}] {thread.subject}"
        mail = self._plain(thread.sender, subject, self._ja_text(self.rng.randint(2, 6)))
        mail.thread = thread
        return mail

    def _redelivery(self) -> Mail:
        original = self.rng.choice(self.mails[-2000:])
        return Mail(
            original.raw,
            "",
            original.message_id,
            original.subject,
            original.sender,
            original.text,
            original=original,
        )

    def _auto_reply(self) -> Mail:
        return self._plain(
            f"noreply@shop{self.rng.randint(1, 400)}.example.jp",
            "自動返信: 不在のお知らせ",
            "ただいま不在にしております。\n",
            "Auto-Submitted: auto-replied\r\n",
        )


@dataclass
class Stored:
    """What the store holds, to place the next rows."""

    ledger: int = 0
    tickets: int = 0
    records: dict[str, tuple[int, int]] = field(default_factory=dict)  # mid -> (ledger, ticket)
    blobs: set[str] = field(default_factory=set)


def raw_table() -> Table | None:
    """Where the raw bytes go: `inbound_raw` since migration 0005, else the ledger row."""
    holder = getattr(models, "InboundRaw", None)
    return holder.__table__ if holder is not None else None


def fill(engine: Engine, corpus: Corpus, stored: Stored, count: int, batch: int = 2000) -> None:
    """Add `count` processed messages from the corpus straight into the tables."""
    ledger_table: Table = InboundMessage.__table__  # type: ignore[assignment]
    raws = raw_table()
    dialect = engine.dialect.name
    done = 0
    while done < count:
        size = min(batch, count - done)
        done += size
        rows: dict[str, list[dict[str, Any]]] = {
            k: [] for k in ("ledger", "raw", "tickets", "comments", "blobs", "attachments")
        }
        ticket_links: list[dict[str, Any]] = []
        attempts: list[dict[str, Any]] = []
        for _ in range(size):
            mail = corpus.next()
            stored.ledger += 1
            inbound_id = stored.ledger
            digest = hashlib.sha256(mail.raw).hexdigest()
            message_id, key = identity_of(mail.raw, digest)
            at = START + timedelta(minutes=inbound_id * 3)
            status, ticket_id, duplicate_of = "ticket", None, None
            if mail.original is not None:
                status = "duplicate"
                duplicate_of, ticket_id = stored.records.get(mail.message_id, (None, None))
                if duplicate_of is None:  # its first delivery made no ticket
                    status = "dropped"
            elif mail.kind == "auto-reply":
                status = "dropped"
            elif mail.thread is not None:
                status = "comment"
                ticket_id = mail.thread.ticket_number or None
                if ticket_id is None:
                    status = "dropped"
            elif corpus.rng.random() < 0.003:
                status = "failed"
            row = {
                "id": inbound_id,
                "received_at": at,
                "source": "smtp",
                "size": len(mail.raw),
                "sha256": digest,
                "message_id": message_id,
                "dedupe_key": key,
                "mail_from": mail.sender,
                "rcpt_to": [f"inquiry@{DOMAIN}"],
                "peer": "192.0.2.10",
                "envelope": {"helo": "mx.example.net"},
                "status": status,
                "fail_stage": "parse" if status == "failed" else None,
                "error": "Traceback ...\nUnreadableMail: x" if status == "failed" else None,
                "attempts": 1,
                "processed_at": at,
                "drop_reason": "auto-reply: Auto-Submitted" if status == "dropped" else None,
                "defects": [],
                "rule_hits": ["everyone-else"],
                "rule_misses": [],
                "duplicate_of_id": duplicate_of,
            }
            if raws is None:
                row["raw"] = mail.raw
            else:
                rows["raw"].append({"inbound_message_id": inbound_id, "raw": mail.raw})
            rows["ledger"].append(row)
            attempts.append(
                {
                    "inbound_message_id": inbound_id,
                    "attempted_at": at,
                    "outcome": status,
                    "host": "bench",
                    "pid": 1,
                    "command": "growth_bench fill",
                }
            )
            if status == "ticket":
                stored.tickets += 1
                ticket_id = stored.tickets
                if mail.thread is None:
                    corpus.threads[-1].ticket_number = ticket_id
                stored.records[mail.message_id] = (inbound_id, ticket_id)
                rows["tickets"].append(
                    {
                        "id": ticket_id,
                        "key": f"INQ-{ticket_id}",
                        "created_at": at,
                        "updated_at": at,
                        "source_kind": "email",
                        "category": "inquiry",
                        "subject": mail.subject,
                        "body": mail.text,
                        "requester_email": mail.sender,
                        "assignee": TEAM[ticket_id % len(TEAM)],
                        "priority": "normal",
                        "status": "closed",
                        "labels": [],
                        "fields": {},
                        "rule_names": ["everyone-else"],
                        "rules_version": "bench",
                        "inbound_message_id": inbound_id,
                        "origin_key": key,
                    }
                )
            elif status == "comment":
                assert ticket_id is not None
                stored.records[mail.message_id] = (inbound_id, ticket_id)
                rows["comments"].append(
                    {
                        "ticket_id": ticket_id,
                        "created_at": at,
                        "author_email": mail.sender,
                        "body": mail.text[:400],
                        "body_full": mail.text,
                        "inbound_message_id": inbound_id,
                        "origin_key": key,
                    }
                )
            if ticket_id is not None:
                ticket_links.append({"b_id": inbound_id, "b_ticket": ticket_id})
            if status == "ticket":
                for name, ctype, content in mail.attachments:
                    sha = hashlib.sha256(content).hexdigest()
                    if sha not in stored.blobs:
                        stored.blobs.add(sha)
                        rows["blobs"].append(
                            {"sha256": sha, "size": len(content), "content": content}
                        )
                    rows["attachments"].append(
                        {
                            "inbound_message_id": inbound_id,
                            "ticket_id": ticket_id,
                            "filename": name,
                            "content_type": ctype,
                            "inline": False,
                            "size": len(content),
                            "sha256": sha,
                        }
                    )
        with engine.begin() as conn:
            conn.execute(insert(ledger_table), rows["ledger"])
            if raws is not None:
                conn.execute(insert(raws), rows["raw"])
            for table, key in (
                (Ticket, "tickets"),
                (TicketComment, "comments"),
                (AttachmentBlob, "blobs"),
                (Attachment, "attachments"),
            ):
                if rows[key]:
                    conn.execute(insert(table), rows[key])
            conn.execute(insert(ProcessingAttempt), attempts)
            if ticket_links:
                conn.execute(
                    update(ledger_table)
                    .where(ledger_table.c.id == bindparam("b_id"))
                    .values(ticket_id=bindparam("b_ticket")),
                    ticket_links,
                )
    with engine.begin() as conn:
        conn.execute(update(Ticket).where(Ticket.status == "open").values(status="closed"))
        conn.execute(
            update(Ticket).where(Ticket.id > stored.tickets - OPEN_TICKETS).values(status="open")
        )
        if dialect == "postgresql":  # the explicit ids bypassed the sequences
            for name in (ledger_table.name, "tickets"):
                conn.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                        f"(SELECT max(id) FROM {name}))"
                    )
                )
    settle(engine)


def settle(engine: Engine) -> None:
    """PostgreSQL: statistics and visibility as autovacuum leaves them. SQLite: the log
    checkpointed, no statistics (mailintake never gathers any)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("VACUUM ANALYZE"))
        else:
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))


@dataclass
class Store:
    """One store filled to `size` messages, measured in turns with the others."""

    backend: str
    size: int
    engine: Engine
    sessions: sessionmaker[Session]
    corpus: Corpus
    ctx: PipelineContext
    times: list[float] = field(default_factory=list)
    cpu: float = 0.0  # this process's user + system CPU seconds over the timed messages
    sys_cpu: float = 0.0
    lookups: list[float] = field(default_factory=list)
    fates: dict[str, int] = field(default_factory=dict)


def open_store(url: str, size: int, seed: int) -> Store:
    engine = db.make_engine(url)
    db.upgrade(engine)
    sessions = db.make_session_factory(engine)
    corpus = Corpus(seed)
    begun = time.perf_counter()
    fill(engine, corpus, Stored(), size)
    print(
        f"  {engine.dialect.name}: filled with {size:,} messages in "
        f"{time.perf_counter() - begun:.0f} s ({size_mb(engine):,.0f} MB)",
        flush=True,
    )
    settings = Settings(
        database={"url": engine.url.render_as_string(hide_password=False)},
        templates={"path": ROOT / "templates.yaml"},
        authserv_id=load_settings(ROOT / "config.yaml").authserv_id,
    )
    rules = load_rules(ROOT / "rules.yaml", settings.zone, settings.authserv_id)
    ctx = PipelineContext(settings, sessions, RulesRouter(lambda: rules))
    return Store(engine.dialect.name, size, engine, sessions, corpus, ctx)


def measure_turn(store: Store, count: int, warmup: int, lookups: int) -> None:
    """Receive and process `count` new mails one by one (after `warmup` untimed ones), then
    time the reply lookup alone."""
    envelope = Envelope(
        source="smtp", mail_from="bounce@example.net", rcpt_to=(f"inquiry@{DOMAIN}",)
    )
    mails = [store.corpus.next() for _ in range(warmup + count)]
    cpu = os.times()
    for n, mail in enumerate(mails):
        if n == warmup:
            cpu = os.times()
        start = time.perf_counter()
        fate = process(store.ctx, receive(store.sessions, mail.raw, envelope))
        elapsed = time.perf_counter() - start
        if n >= warmup:
            store.times.append(elapsed)
            store.fates[str(fate)] = store.fates.get(str(fate), 0) + 1
    done = os.times()
    store.cpu += done.user + done.system - cpu.user - cpu.system
    store.sys_cpu += done.system - cpu.system
    store.lookups.append(reply_lookup(store.sessions, store.corpus, lookups))


def reply_lookup(sessions: sessionmaker[Session], corpus: Corpus, samples: int = 100) -> float:
    """Mean time of the reply -> ticket lookup for threads anywhere in the store, given
    In-Reply-To and References as the pipeline gives them."""
    threads = [t for t in corpus.threads if t.ticket_number]
    picks = [
        (ids := corpus.rng.choice(threads).message_ids)[-1:] + ids[-10:] for _ in range(samples)
    ]
    with sessions() as session:
        repo.ticket_for_message_ids(session, picks[0])
        start = time.perf_counter()
        for refs in picks:
            repo.ticket_for_message_ids(session, refs)
        return (time.perf_counter() - start) / samples


def size_mb(engine: Engine) -> float:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            found = conn.scalar(
                text(
                    "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
                )
            )
            return float(found or 0) / 1e6
    return Path(engine.url.database or "").stat().st_size / 1e6


def bench(urls: dict[int, str], args: argparse.Namespace) -> list[Store]:
    """Fill one store per size, then measure them in turns, so that a load that comes and goes
    on the machine falls on every size alike."""
    stores = [open_store(url, size, args.seed) for size, url in sorted(urls.items())]
    per_turn = -(-args.measure // args.turns)
    for _ in range(args.turns):
        for store in stores:
            measure_turn(store, per_turn, args.warmup, args.lookups)
    for store in stores:
        store.engine.dispose()
    return stores


def report(stores: list[Store]) -> None:
    print(
        f"\n{'backend':10s} {'stored':>8s} {'timed':>5s} {'mean ms':>8s} {'p50 ms':>7s} "
        f"{'p95 ms':>7s} {'msg/s':>6s} {'cpu ms':>7s} {'sys ms':>7s} {'lookup ms':>9s} "
        f"{'mean x':>6s} {'p50 x':>6s}  fates"
    )
    first: dict[str, Store] = {}
    for store in stores:
        base = first.setdefault(store.backend, store)
        n = len(store.times)
        mean, p50 = statistics.fmean(store.times), statistics.median(store.times)
        p95 = statistics.quantiles(store.times, n=20)[18]
        fates = ", ".join(f"{k} {v}" for k, v in sorted(store.fates.items()))
        print(
            f"{store.backend:10s} {store.size:8,d} {n:5d} {mean * 1000:8.1f} {p50 * 1000:7.1f} "
            f"{p95 * 1000:7.1f} {1 / mean:6.1f} {store.cpu / n * 1000:7.1f} "
            f"{store.sys_cpu / n * 1000:7.2f} {statistics.median(store.lookups) * 1000:9.3f} "
            f"{mean / statistics.fmean(base.times):6.2f} "
            f"{p50 / statistics.median(base.times):6.2f}  {fates}"
        )
    for backend in first:
        means = [statistics.fmean(s.times) for s in stores if s.backend == backend]
        spread = max(means) / min(means)
        verdict = "flat" if spread <= 1.2 else "NOT flat"
        print(
            f"{backend}: largest/smallest mean time per message {spread:.2f}: {verdict} (<= 1.20)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--measure", type=int, default=300, help="timed messages per size")
    parser.add_argument("--turns", type=int, default=6, help="measure the sizes in this many turns")
    parser.add_argument("--warmup", type=int, default=5, help="untimed messages before each turn")
    parser.add_argument("--lookups", type=int, default=100, help="reply lookups timed per turn")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--pg-max-size",
        type=int,
        default=100_000,
        help="largest store on PostgreSQL (filling 100,000 takes several minutes)",
    )
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--no-pg", action="store_true")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    stores: list[Store] = []
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            stores += bench({size: f"sqlite:///{tmp}/growth-{size}.db" for size in sizes}, args)
    if not args.no_pg:
        stores += bench_pg(args, [s for s in sizes if s <= args.pg_max_size])
    report(stores)


def bench_pg(args: argparse.Namespace, sizes: list[int]) -> list[Store]:
    """The same on PostgreSQL, one schema per size, dropped afterwards."""
    admin = create_engine(args.pg_url)
    schemas = {size: f"growth_{uuid.uuid4().hex[:8]}" for size in sizes}
    try:
        with admin.begin() as conn:
            for schema in schemas.values():
                conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:
        print(f"postgresql skipped: {exc.__class__.__name__}: {exc}")
        return []
    try:
        return bench(
            {s: f"{args.pg_url}?options=-csearch_path%3D{schemas[s]}" for s in sizes}, args
        )
    finally:
        with admin.begin() as conn:
            for schema in schemas.values():
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    main()

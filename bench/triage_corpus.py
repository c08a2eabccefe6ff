"""A seeded generator of a realistic labelled ticket history for the triage assistant.

Past tickets across the categories of the shipped rules.yaml (inquiry, callback, order, quote,
web-inquiry, complaint), as the four shapes the company receives: customer mail in Japanese and
English, the answering service's call notes, the FAX gateway's notices and the web form. Each
carries the label a person settled on (people correct what the rules decided), so the history
disagrees with the rules where real history does: an order or a complaint by plain mail, a
complaint taken by the answering service, a quotation requested by FAX or through the form.

The noise real mail has: greetings and closings, signatures, quoted earlier replies, typos,
full-width digits and letters, and a few labels that are simply wrong.

    from bench.triage_corpus import generate, load_history
    history = generate(3000, seed=7)
    load_history(pipeline_context, history)   # ledger rows + tickets with the people's labels
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.header import Header
from email.utils import format_datetime

from ingest.intake import unstored_mail
from ingest.mail import Envelope
from pipeline.context import PipelineContext
from pipeline.stages import examine
from storage.models import InboundMessage, Ticket
from storage.states import Fate, Source

OUR_ADDRESS = "inquiry@wine-importer.example.jp"
SALES = ("suzuki", "takahashi", "yamada")

SURNAMES = ["田中", "伊藤", "渡辺", "中村", "小林", "加藤", "吉田", "山口", "松本", "井上"]
SURNAMES += ["木村", "林", "清水", "森", "池田", "橋本", "石川", "前田", "藤田", "岡田"]
GIVEN = ["健一", "美穂", "大輔", "由美", "翔太", "直子", "誠", "恵", "隆", "優子"]
SHOPS = ["酒店", "酒販", "ワインショップ", "リカーズ", "商店"]
VENUES = ["レストラン", "ビストロ", "ホテル", "ワインバー", "トラットリア"]
PLACES = ["サクラ", "みなと", "銀座", "青葉", "ひまわり", "丸の内", "さくら坂", "北野", "若葉"]
EN_NAMES = ["John Smith", "Emma Brown", "Liam Wilson", "Olivia Taylor", "Noah Davies"]
EN_NAMES += ["Mia Clarke", "Lucas Martin", "Chloe Evans", "Ethan Hughes", "Ava Walker"]
EN_VENUES = ["Harbor Bistro", "Tokyo Wine Club", "Azabu Grill", "Blue Door Bar", "Kobe Table"]
WINES = ["シャブリ 2022", "ボルドー赤 2019", "ブルゴーニュ ピノ・ノワール", "キャンティ 2020"]
WINES += ["リースリング", "プロセッコ", "バローロ 2017", "ソーヴィニヨン・ブラン", "カヴァ"]
EN_WINES = ["Chablis 2022", "Bordeaux 2019", "Pinot Noir", "Chianti 2020", "Riesling"]
EN_WINES += ["Prosecco", "Barolo 2017", "Sauvignon Blanc", "Cava"]

# Phrases per intent: (Japanese, English). `{w}` a wine, `{n}` a number of bottles or cases.
PHRASES: dict[str, tuple[list[str], list[str]]] = {
    "complaint-known": (
        [
            "本日届いた{w}のうち{n}本が割れていました。",
            "配送中に破損したようで、箱が濡れていました。",
            "{w}が液漏れしていました。",
            "瓶が割れて届きました。交換をお願いできますか。",
        ],
        ["{n} bottles of {w} arrived broken (破損).", "The {w} was leaking (液漏れ) on arrival."],
    ),
    "complaint": (
        [
            "届いた{w}のコルクが沈んでいました。",
            "開けた{w}がブショネのようで、においがおかしいです。",
            "注文と違う銘柄が届いております。",
            "ラベルが汚れていて店頭に出せません。",
            "{n}ケース頼んだはずが1ケースしか届いていません。",
            "到着予定日を過ぎてもまだ届きません。",
            "請求書の金額が見積と合っていないようです。",
            "ワインが劣化して酸っぱくなっていました。",
        ],
        [
            "The {w} we received is corked and smells of wet cardboard.",
            "We received the wrong wine: {w} instead of what we ordered.",
            "Half of the case arrived with damaged labels; we cannot sell them.",
            "Our delivery is a week late and we have an event tomorrow.",
            "The invoice does not match the agreed price.",
        ],
    ),
    "order": (
        [
            "{w}を{n}本注文いたします。",
            "下記の通り発注をお願いいたします。{w} {n}ケース。",
            "いつもの{w}を追加で{n}本お願いします。",
            "来週納品で{w}を{n}本手配してください。",
            "注文書を添付いたしますので、ご手配ください。",
        ],
        [
            "We would like to order {n} cases of {w}.",
            "Please ship {n} bottles of {w} next week.",
            "Could you add {n} bottles of {w} to our standing order?",
            "Purchase order attached: {w} x {n}.",
        ],
    ),
    "quote": (
        [
            "{w}を{n}ケース購入した場合の価格を教えてください。",
            "業務用の卸価格表をいただけますか。",
            "{w}の御見積をお願いいたします。",
            "新店舗オープンにあたり、ワインリストの価格をご提示ください。",
            "{n}本まとめて購入する場合の単価を知りたいです。",
        ],
        [
            "Could you send us your wholesale price list?",
            "What would {n} cases of {w} cost?",
            "Please quote us for {n} bottles of {w}, delivered to Osaka.",
            "We need pricing for our new wine list.",
        ],
    ),
    "callback": (
        [
            "お手数ですが、お電話いただけますでしょうか。",
            "折り返しお電話をお願いいたします。",
            "担当の方からご連絡いただきたいです。電話でお話ししたいことがあります。",
            "本日中に電話をいただけると助かります。",
        ],
        [
            "Could someone call me back this afternoon?",
            "Please give me a call when you can.",
            "I would prefer to discuss this by phone; please call me.",
        ],
    ),
    "inquiry-stock": (
        [
            "{w}の在庫はございますか。",
            "{w}は{n}本ほど確保できますでしょうか。",
            "{w}の次回入荷はいつ頃になりますか。",
            "ヴィンテージ違いの在庫状況を教えてください。",
        ],
        [
            "Do you have {w} in stock?",
            "When will {w} be available again?",
            "Can you reserve {n} bottles of {w} for us?",
        ],
    ),
    "inquiry-event": (
        [
            "来月の試飲会への参加方法を教えてください。",
            "ワインセミナーの日程を知りたいです。",
            "試飲会に{n}名で参加できますか。",
            "店舗向けの勉強会は開催されていますか。",
        ],
        [
            "How can we join your tasting event next month?",
            "Are there seats left for the wine seminar?",
            "Do you run staff training tastings?",
        ],
    ),
    "inquiry-product": (
        [
            "{w}のブドウ品種と産地を教えてください。",
            "{w}に合う料理のおすすめはありますか。",
            "{w}はオーガニック認証を受けていますか。",
            "{w}の保管温度について教えてください。",
        ],
        [
            "What grapes go into the {w}?",
            "Which dishes would you pair with {w}?",
            "Is the {w} certified organic?",
            "At what temperature should we store {w}?",
        ],
    ),
}
INQUIRY_OWNER = {"inquiry-stock": "takahashi", "inquiry-event": "yamada"}
INQUIRY_OWNER["inquiry-product"] = "suzuki"
OWNER = {"complaint": "sato", "complaint-known": "sato", "order": "sato", "quote": "suzuki"}
OWNER["callback"] = "yamada"
SUBJECTS: dict[str, tuple[list[str], list[str]]] = {
    "complaint-known": (
        ["商品破損について", "割れた瓶について"],
        ["Broken bottles", "Damaged delivery"],
    ),
    "complaint": (
        ["届いた商品について", "先日の納品の件", "ご確認のお願い"],
        ["About our delivery", "Problem"],
    ),
    "order": (["注文のお願い", "追加発注", "ご注文", "発注書送付"], ["Order", "New order", "PO"]),
    "quote": (
        ["価格のご相談", "お見積りのお願い", "卸価格について"],
        ["Price list", "Quotation request"],
    ),
    "callback": (["お電話のお願い", "ご連絡のお願い"], ["Please call", "Call back"]),
    "inquiry-stock": (["在庫について", "入荷時期のお問い合わせ"], ["Stock", "Availability"]),
    "inquiry-event": (["試飲会について", "セミナーの件"], ["Tasting event", "Seminar"]),
    "inquiry-product": (["商品について", "ワインについて質問"], ["Question about a wine", "Info"]),
}
GREETINGS_JA = [
    "いつもお世話になっております。",
    "お世話になります。",
    "初めてご連絡いたします。",
    "",
]
GREETINGS_EN = ["Dear Sales team,", "Hello,", "Hi there,", "Dear Sir or Madam,"]
CLOSINGS_JA = [
    "よろしくお願いいたします。",
    "ご確認のほど、よろしくお願い申し上げます。",
    "以上、よろしくお願いします。",
]
CLOSINGS_EN = ["Best regards,", "Kind regards,", "Thanks,", "Sincerely,"]
OUR_REPLIES = [
    "お問い合わせありがとうございます。担当より確認のうえご連絡いたします。",
    "先日は試飲会にご参加いただきありがとうございました。",
    "ご注文の商品は本日出荷いたしました。",
    "Thank you for your message. Our sales team will get back to you shortly.",
]
FAX_MEMOS = {
    "order": ["注文書を送付します", "発注書 在中", "追加注文分"],
    "quote": ["見積依頼書", "価格のご提示をお願いします"],
    "complaint": ["破損品について", "返品のお願い"],
}
FORM_TYPES = {
    "web-inquiry": ["在庫確認", "商品について", "その他"],
    "quote": ["見積依頼", "価格について"],
}
FORM_TYPES["complaint"] = ["配送について", "その他", "商品について"]
CATEGORIES = ("inquiry", "callback", "order", "quote", "web-inquiry", "complaint")
WIDE = str.maketrans(
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "０１２３４５６７８９ＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＸＹＺ",
)


@dataclass(frozen=True)
class PastTicket:
    """A past inquiry: the raw mail, when it came, and the labels people settled on."""

    raw: bytes
    received_at: datetime
    source_kind: str
    category: str
    assignee: str


class Writer:
    """One seeded history; every choice goes through `self.rng`."""

    def __init__(self, seed: int, authserv_id: str | None) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.authserv_id = authserv_id

    def pick(self, options: Sequence[str]) -> str:
        return self.rng.choice(list(options))

    def person(self) -> tuple[str, str]:
        surname, given = self.pick(SURNAMES), self.pick(GIVEN)
        return f"{surname} {given}", f"{self.pick(PLACES)}{self.pick(SHOPS + VENUES)}"

    def phrase(self, intent: str, english: bool) -> str:
        text = self.pick(PHRASES[intent][1 if english else 0])
        wine = self.pick(EN_WINES if english else WINES)
        return self.noisy(text.format(w=wine, n=self.rng.choice([2, 3, 6, 12, 24])), english)

    def noisy(self, text: str, english: bool) -> str:
        """Typos (a dropped or swapped letter) and full-width digits and letters, sometimes."""
        if self.rng.random() < 0.12 and len(text) > 8:
            i = self.rng.randrange(1, len(text) - 2)
            text = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
        if english and self.rng.random() < 0.08:
            i = self.rng.randrange(1, len(text) - 1)
            text = text[:i] + text[i + 1 :]
        if not english and self.rng.random() < 0.3:
            text = text.translate(WIDE)
        return text

    def intent_of(self, kind: str) -> str:
        weights = {
            "email": {"inquiry": 30, "order": 20, "quote": 18, "complaint": 17, "callback": 15},
            "phone": {"callback": 70, "complaint": 15, "order": 15},
            "fax": {"order": 80, "quote": 12, "complaint": 8},
            "webform": {"web-inquiry": 65, "quote": 20, "complaint": 15},
        }[kind]
        intent = self.rng.choices(list(weights), list(weights.values()))[0]
        if intent in ("inquiry", "web-inquiry"):
            return self.pick(list(INQUIRY_OWNER)) + ("@web" if intent == "web-inquiry" else "")
        if intent == "complaint" and self.rng.random() < 0.4:
            return "complaint-known"
        return intent

    def labels(self, intent: str) -> tuple[str, str]:
        topic, _, web = intent.partition("@")
        if topic in INQUIRY_OWNER:
            category, owner = ("web-inquiry" if web else "inquiry"), INQUIRY_OWNER[topic]
        else:
            category, owner = topic.removesuffix("-known"), OWNER[topic]
        if self.rng.random() < 0.04:  # a label nobody corrected
            category = self.pick(CATEGORIES)
        if self.rng.random() < 0.08:
            owner = self.pick((*SALES, "sato"))
        return category, owner

    def message(self, sender: str, subject: str, body: str, at: datetime, index: int) -> bytes:
        """A plain-text UTF-8 mail (built by hand: the email package's writer is ten times
        slower, which counts for thousands of mails)."""
        name, _, address = sender.rpartition(" ")
        sender = f"{Header(name, 'utf-8').encode()} {address}" if name else sender
        head = [f"From: {sender}"]
        if self.authserv_id:  # our MTA verified the sender's DKIM signature (binds the gateways)
            domain = address.strip("<>").rpartition("@")[2]
            verdict = f"{self.authserv_id}; dkim=pass header.d={domain}"
            head.insert(0, f"Authentication-Results: {verdict}")
        head += [
            f"To: {OUR_ADDRESS}",
            f"Subject: {Header(subject, 'utf-8').encode()}",
            f"Date: {format_datetime(at)}",
            f"Message-ID: <history-{self.seed}-{index}@customers.example>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ]
        return ("\r\n".join(head) + "\r\n\r\n" + body.replace("\n", "\r\n")).encode()

    def email(self, intent: str, at: datetime, index: int) -> bytes:
        topic = intent.partition("@")[0]
        english = self.rng.random() < 0.25
        if english:
            name, company = self.pick(EN_NAMES), self.pick(EN_VENUES)
            lines = [self.pick(GREETINGS_EN), ""]
        else:
            name, company = self.person()
            lines = [f"{self.pick(VENUES)}ご担当者様", "", self.pick(GREETINGS_JA)]
            lines += [f"{company}の{name.split()[0]}です。", ""]
        lines += [self.phrase(topic, english) for _ in range(self.rng.choice([1, 1, 2]))]
        if self.rng.random() < 0.3:
            lines.append(self.phrase(self.pick(list(PHRASES)), english))  # a second matter
        lines += ["", self.pick(CLOSINGS_EN if english else CLOSINGS_JA), "", "--", name, company]
        subject = self.pick(SUBJECTS[topic][1 if english else 0])
        if self.rng.random() < 0.2:  # a reply quoting our earlier answer
            subject = f"Re: {subject}"
            lines += ["", f"{at:%Y/%m/%d} wine-importer <{OUR_ADDRESS}>:"]
            lines += [f"> {self.pick(OUR_REPLIES)}", "> ", "> ワイン輸入 営業部"]
        address = f"{name.split()[0].lower()}{index}@customers.example"
        return self.message(f"{name} <{address}>", subject, "\n".join(lines), at, index)

    def phone(self, intent: str, at: datetime, index: int) -> bytes:
        name, company = self.person()
        call_id = f"A-{1000 + index}"
        topic = self.phrase(intent, False)
        if intent == "callback":
            topic = f"{self.phrase(self.pick(list(INQUIRY_OWNER)), False)}{topic}"
        body = "\n".join(
            [
                "電話代行サービス「でんわ代行センター」より着信のご連絡です。",
                "",
                f"■受付日時：{at:%Y年%m月%d日 %H時%M分}",
                f"■会社名　：{company}",
                f"■お名前　：{name} 様",
                f"■電話番号：{self.noisy(f'03-{self.rng.randrange(1000, 9999)}-5678', False)}",
                "■ご用件　：",
                topic,
                f"■受付番号：{call_id}",
                "",
                "―――――――――――――――",
                "でんわ代行センター　東京オフィス",
            ]
        )
        subject = f"【電話受付】お問い合わせのご連絡（受付番号 {call_id}）"
        return self.message("uketsuke@denwa-daiko.example.com", subject, body, at, index)

    def fax(self, intent: str, at: datetime, index: int) -> bytes:
        number = f"03-{self.rng.randrange(1000, 9999)}-{self.rng.randrange(1000, 9999)}"
        pages = self.rng.randint(1, 4)
        lines = ["FAXを受信しました。", "", f"送信元番号: {number}"]
        lines += [f"送信元名: {self.person()[1]}", f"受信日時: {at:%Y/%m/%d %H:%M:%S}"]
        lines += [f"ページ数: {pages}"]
        if self.rng.random() < 0.7:
            lines.append(f"表紙メモ: {self.pick(FAX_MEMOS[intent.removesuffix('-known')])}")
        lines += ["", "受信したFAXは添付のPDFファイルをご覧ください。"]
        subject = f"FAX受信 送信元:{number} ({pages}ページ)"
        return self.message("noreply@faxgw.example.net", subject, "\n".join(lines), at, index)

    def webform(self, intent: str, at: datetime, index: int) -> bytes:
        topic = intent.partition("@")[0]
        name, company = self.person()
        kind = "web-inquiry" if topic in INQUIRY_OWNER else topic.removesuffix("-known")
        text = [self.phrase(topic, False)]
        if self.rng.random() < 0.5:
            text.append(self.phrase(topic, False))
        body = "\n".join(
            [
                f"お名前: {name}",
                f"会社名: {company}",
                f"メールアドレス: user{index}@customers.example",
                f"お問い合わせ種別: {self.pick(FORM_TYPES[kind])}",
                "お問い合わせ内容:",
                *text,
                "",
                "-- ",
                "このメールは ワイン輸入 (https://wine-importer.example.jp) の"
                "お問い合わせフォームから送信されました",
            ]
        )
        subject = f"[ワイン輸入] お問い合わせ: {self.pick(SUBJECTS[topic][0])}"
        return self.message("wordpress@wine-importer.example.jp", subject, body, at, index)


def generate(
    count: int,
    seed: int = 7,
    end: datetime | None = None,
    days: int = 150,
    authserv_id: str | None = None,
) -> list[PastTicket]:
    """`count` past tickets received over the `days` before `end` (default: now), oldest first;
    with `authserv_id` (config `authserv_id`) each carries our MTA's DKIM verdict, so the
    gateways' mails are proven as theirs."""
    writer = Writer(seed, authserv_id)
    end = end or datetime.now(UTC)
    offsets = sorted(writer.rng.uniform(0, days * 86400) for _ in range(count))
    kinds = writer.rng.choices(["email", "phone", "fax", "webform"], [55, 20, 12, 13], k=count)
    history = []
    for index, (offset, kind) in enumerate(zip(offsets, kinds, strict=True)):
        at = end - timedelta(seconds=days * 86400 - offset)
        intent = writer.intent_of(kind)
        raw = getattr(writer, kind)(intent, at, index)
        category, assignee = writer.labels(intent)
        history.append(PastTicket(raw, at, kind, category, assignee))
    return history


def load_history(ctx: PipelineContext, history: Sequence[PastTicket]) -> None:
    """Store each past ticket as the pipeline would have (ledger row with the raw bytes, the
    ticket with the examined text and fields), labelled as people corrected it."""
    with ctx.sessions.begin() as session:
        for past in history:
            mail = unstored_mail(past.raw, Envelope(source=Source.FILE), past.received_at)
            examine(mail, ctx)
            assert mail.parsed is not None
            row = InboundMessage(
                received_at=past.received_at,
                source=Source.FILE,
                raw=past.raw,
                size=len(past.raw),
                sha256=mail.dedupe_key[-64:],
                dedupe_key=mail.dedupe_key,
                status=Fate.TICKET,
                processed_at=past.received_at,
            )
            session.add(row)
            session.flush()
            ticket = Ticket(
                key=f"HIST-{row.id}",
                created_at=past.received_at,
                source_kind=mail.source_kind,
                category=past.category,
                subject=mail.parsed.subject,
                body=mail.parsed.text,
                assignee=past.assignee,
                priority="normal",
                fields=mail.fields,
                inbound_message_id=row.id,
                origin_key=mail.dedupe_key,
            )
            session.add(ticket)
            session.flush()
            row.ticket_id = ticket.id

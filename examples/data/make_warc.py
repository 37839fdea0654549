"""Build ``python-docs.warc.gz``: real HTML pages (the Python 3.11 documentation, PSF licence) in a WARC,
with planted cases for the Corpus pipeline to catch. Deterministic: the same input gives the same bytes.

    apt-get download python3.11-doc            # Debian/Ubuntu; the HTML is under usr/share/doc/python3.11/html
    python examples/data/make_warc.py python3.11-doc_*.deb   # or the extracted html directory

What is inside (URLs under https://docs.python.org/3.11/ unless said otherwise):

* ~100 documentation pages (tutorial, HOWTOs, FAQ, part of the library reference), sidebars and scripts
  stripped to keep the file small; about every fifth response has no ``WARC-Identified-Payload-Type``
  header (older crawls), so readers must look at the HTTP Content-Type or the payload.
* exact duplicates: 3 pages again under ``https://mirror.python-docs.test/…`` (same text);
* near duplicates: 3 pages again under ``https://archive.python-docs.test/…`` with a banner and a few
  words changed (MinHash must catch them, exact dedup must not);
* spam: 2 pages of repeated advertising lines, and one lorem-ipsum page;
* a blocklisted domain: 2 pages on ``https://example-spam.com/…`` (otherwise fine text);
* non-English: 2 pages each in German, French and Spanish;
* PII: e-mail addresses and public IP addresses in 3 pages (``PII_MARKERS`` lists them);
* noise records a reader must skip: a request, a metadata record and a ``text/css`` response.

The Python documentation is © Python Software Foundation, under the PSF License Agreement
(https://docs.python.org/3/license.html); the planted texts are written for this file.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "python-docs.warc.gz"
BASE = "https://docs.python.org/3.11/"
DATE = "2024-03-01T12:00:00Z"

# Pages whose planted copies the tests look for.
EXACT_DUPLICATES = ["tutorial/modules.html", "tutorial/introduction.html", "faq/general.html"]
NEAR_DUPLICATES = ["tutorial/datastructures.html", "howto/unicode.html", "tutorial/errors.html"]
BLOCKLISTED = ["howto/ipaddress.html", "tutorial/stdlib2.html"]
PII_PAGES = ["tutorial/interpreter.html", "tutorial/venv.html", "howto/urllib2.html"]
PII_MARKERS = [
    "maintainer.docs@python-docs.test",
    "guido.example@pythonmail.test",
    "93.184.216.34",
    "151.101.0.223",
]
LIBRARY_PAGES = 70
MAX_PAGE_BYTES = 60_000  # library pages: raw file size
MAX_CLEANED_BYTES = 80_000  # any page after cleaning: the longest HOWTOs cost seconds to extract

FOREIGN = {
    "de": [
        "Die Stadtbibliothek öffnet am Montag wieder ihre Türen, nachdem die Renovierung des alten Lesesaals "
        "länger gedauert hat als geplant. Die Besucher finden dort jetzt mehr Licht, bequemere Stühle und "
        "eine neue Abteilung für Kinderbücher. Wer ein Buch ausleihen möchte, braucht weiterhin einen "
        "gültigen Ausweis, der an der Theke im Erdgeschoss ausgestellt wird.",
        "Im Sommer veranstaltet die Bibliothek jeden Donnerstag eine Lesung im Innenhof. Die Autorinnen und "
        "Autoren stellen ihre neuen Romane vor und beantworten danach die Fragen des Publikums. Der Eintritt "
        "ist frei, aber die Plätze sind begrenzt, deshalb sollte man rechtzeitig kommen.",
        "Der Wetterdienst erwartet für das kommende Wochenende kräftige Gewitter im Süden des Landes. In den "
        "Bergen kann es zu Hagel und starken Böen kommen, während es im Norden überwiegend trocken und mild "
        "bleibt. Wanderer sollten ihre Touren früh am Tag beginnen und die Warnungen im Radio verfolgen.",
        "Die Landwirte hoffen dagegen auf den Regen, denn nach den trockenen Wochen sind die Böden hart und die "
        "Ernte der Kartoffeln droht kleiner auszufallen als im vergangenen Jahr. Viele Betriebe bewässern "
        "ihre Felder bereits seit Anfang des Monats.",
    ],
    "fr": [
        "Le marché couvert du quartier rouvre ses portes samedi matin après trois mois de travaux. Les "
        "commerçants ont retrouvé leurs places habituelles et proposent de nouveau des fruits, des légumes, "
        "du fromage et du pain frais. La mairie a profité des travaux pour installer un nouvel éclairage et "
        "des bancs pour les clients qui veulent se reposer.",
        "Les habitants se réjouissent de ce retour, car le marché est depuis longtemps le cœur de la vie du "
        "quartier. On y vient pour faire ses courses, mais aussi pour discuter avec les voisins et prendre "
        "un café à la terrasse de la petite brasserie qui se trouve à l'entrée.",
        "Le festival de musique de la ville aura lieu cette année du premier au dix juillet. Une trentaine de "
        "concerts sont prévus dans les parcs, les églises et sur les places publiques. La plupart des "
        "spectacles sont gratuits, mais il faut réserver pour les concerts du soir au théâtre municipal.",
        "Les organisateurs espèrent accueillir plus de visiteurs que l'année dernière et ont prévu des "
        "navettes gratuites entre la gare et les différents lieux du festival. Des bénévoles seront présents "
        "pour renseigner le public pendant toute la durée de la manifestation.",
    ],
    "es": [
        "El ayuntamiento ha anunciado que la piscina municipal abrirá el próximo lunes con un horario "
        "ampliado durante todo el verano. Los vecinos podrán nadar desde las ocho de la mañana hasta las "
        "nueve de la noche, y los niños menores de doce años tendrán entrada gratuita los fines de semana.",
        "Además, se han organizado cursos de natación para adultos y para niños, que empezarán en la segunda "
        "semana de julio. Las inscripciones se pueden hacer en las oficinas del polideportivo o por teléfono, "
        "y las plazas se asignarán por orden de llegada.",
        "La cosecha de aceitunas de este año ha sido mejor de lo esperado gracias a las lluvias de la "
        "primavera. Los agricultores de la comarca calculan que la producción de aceite será un veinte por "
        "ciento mayor que la del año pasado, lo que ayudará a bajar los precios en las tiendas.",
        "Las cooperativas ya están preparando las almazaras para recibir la fruta, y muchas familias de la "
        "zona trabajarán durante varias semanas en la recogida, como hacen desde hace generaciones.",
    ],
}

SPAM_LINES = [
    "BUY CHEAP WATCHES NOW!!! BEST PRICES ONLINE!!! CLICK HERE!!!",
    "Limited offer: cheap watches, cheap bags, cheap shoes. Click here now.",
    "Best deals best deals best deals. Order today and save big.",
]
LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
    "ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu "
    "fugiat nulla pariatur."
)


def html_root(arg: str) -> Path:
    path = Path(arg)
    if path.is_dir():
        return path
    tmp = Path(tempfile.mkdtemp(prefix="pydoc-"))
    subprocess.run(["dpkg-deb", "-x", str(path), str(tmp)], check=True)
    return tmp / "usr/share/doc/python3.11/html"


def clean(raw: bytes) -> bytes:
    """The page without scripts, stylesheets, sidebars and navigation bars (smaller, same article)."""
    import lxml.html

    doc = lxml.html.fromstring(raw)
    for xpath in (
        "//script",
        "//link",
        "//style",
        "//div[contains(@class,'sphinxsidebar')]",
        "//div[contains(@class,'related')]",
        "//div[contains(@class,'footer')]",
        "//div[contains(@class,'mobile-nav')]",
        "//a[contains(@class,'headerlink')]",
    ):
        for el in doc.xpath(xpath):
            el.drop_tree()
    return b"<!DOCTYPE html>\n" + lxml.html.tostring(doc, encoding="utf-8")


def page(title: str, paragraphs: list[str], lang: str = "en") -> bytes:
    body = "\n".join(f"<p>{p}</p>" for p in paragraphs)
    return (
        f'<!DOCTYPE html>\n<html lang="{lang}"><head><meta charset="utf-8"><title>{title}</title></head>'
        f"<body><article><h1>{title}</h1>\n{body}\n</article></body></html>"
    ).encode()


def select(root: Path) -> list[str]:
    pages = []
    for section in ("tutorial", "howto", "faq"):
        pages += sorted(
            f"{section}/{p.name}" for p in (root / section).glob("*.html") if p.name != "index.html"
        )
    library = sorted(
        f"library/{p.name}"
        for p in (root / "library").glob("*.html")
        if 15_000 <= p.stat().st_size <= MAX_PAGE_BYTES and p.name != "index.html"
    )
    step = max(1, len(library) // LIBRARY_PAGES)
    return pages + library[::step][:LIBRARY_PAGES]


def near_copy(html: bytes, n: int) -> bytes:
    """A mirror's copy: a banner on top and a few words changed."""
    text = html.decode("utf-8")
    banner = f"<p>Archived copy {n} of the Python documentation, kept for reference.</p>"
    text = text.replace("<body>", "<body>" + banner, 1) if "<body>" in text else banner + text
    for old, new in (("example", "sample"), ("function", "routine"), ("Python", "CPython")):
        text = text.replace(old, new, 2)
    return text.encode("utf-8")


def with_pii(html: bytes, i: int) -> bytes:
    email = PII_MARKERS[i % 2]
    ip = PII_MARKERS[2 + i % 2]
    note = (
        f"<p>Questions about this page can be sent to {email}; the download mirror for this section "
        f"runs at {ip} and answers within a day.</p>"
    )
    text = html.decode("utf-8")
    return (text.replace("</h1>", "</h1>" + note, 1) if "</h1>" in text else note + text).encode("utf-8")


def record_id(url: str, n: int) -> str:
    digest = hashlib.sha1(f"{n}:{url}".encode()).hexdigest()
    return f"<urn:uuid:{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}>"


def build(root: Path) -> list[tuple[str, bytes, str]]:
    """(url, payload, content type) of every response, in file order."""
    entries: list[tuple[str, bytes, str]] = []
    cleaned = {rel: clean((root / rel).read_bytes()) for rel in select(root)}
    cleaned = {rel: html for rel, html in cleaned.items() if len(html) <= MAX_CLEANED_BYTES}
    for rel, html in cleaned.items():
        if rel in BLOCKLISTED:
            continue
        if rel in PII_PAGES:
            html = with_pii(html, PII_PAGES.index(rel))
        entries.append((BASE + rel, html, "text/html; charset=utf-8"))
    documentation = len(entries)
    for rel in EXACT_DUPLICATES:
        entries.append((f"https://mirror.python-docs.test/3.11/{rel}", cleaned[rel], "text/html"))
    for n, rel in enumerate(NEAR_DUPLICATES):
        entries.append(
            (f"https://archive.python-docs.test/3.11/{rel}", near_copy(cleaned[rel], n), "text/html")
        )
    for rel in BLOCKLISTED:
        entries.append((f"https://example-spam.com/docs/{rel}", cleaned[rel], "text/html"))
    for n in range(2):
        lines = [SPAM_LINES[(n + k) % len(SPAM_LINES)] for k in range(40)]
        entries.append((f"https://deals-{n}.shop.test/offers.html", page("Offers", lines), "text/html"))
    entries.append(("https://placeholder.test/lorem.html", page("Lorem", [LOREM] * 6), "text/html"))
    for lang, paragraphs in FOREIGN.items():
        for n in range(2):
            chosen = paragraphs[2 * n : 2 * n + 2] * 3
            entries.append(
                (f"https://news-{lang}.test/article-{n}.html", page(f"{lang} {n}", chosen, lang), "text/html")
            )
    # interleave the planted pages with the documentation (a crawl is not sorted by topic)
    docs, planted = entries[:documentation], entries[documentation:]
    out: list[tuple[str, bytes, str]] = []
    gap = max(1, len(docs) // (len(planted) + 1))
    for i, entry in enumerate(docs):
        out.append(entry)
        if i % gap == gap - 1 and planted:
            out.append(planted.pop(0))
    return out + planted


def write(entries: list[tuple[str, bytes, str]], path: Path) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    info = writer.create_warc_record(
        "python-docs.warc.gz",
        "warcinfo",
        payload=io.BytesIO(b"software: lmforge examples/data/make_warc.py\r\nformat: WARC/1.0\r\n"),
        warc_headers_dict={"WARC-Record-ID": record_id("warcinfo", 0), "WARC-Date": DATE},
    )
    writer.write_record(info)
    for n, (url, payload, ctype) in enumerate(entries):
        headers = {"WARC-Record-ID": record_id(url, n), "WARC-Date": DATE}
        if n % 5 != 3:  # about one in five has no payload type, like older crawls
            headers["WARC-Identified-Payload-Type"] = "text/html"
        http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
        rec = writer.create_warc_record(
            url,
            "response",
            payload=io.BytesIO(payload),
            http_headers=http,
            warc_headers_dict=headers,
            length=len(payload),
        )
        writer.write_record(rec)
        if n == 10:  # noise a reader must skip
            req = writer.create_warc_record(
                url,
                "request",
                payload=io.BytesIO(b"GET / HTTP/1.1\r\nHost: docs.python.org\r\n\r\n"),
                warc_headers_dict={"WARC-Record-ID": record_id(url, -1), "WARC-Date": DATE},
            )
            writer.write_record(req)
            css = b"body { font-family: sans-serif; }"
            rec = writer.create_warc_record(
                BASE + "_static/pydoctheme.css",
                "response",
                payload=io.BytesIO(css),
                http_headers=StatusAndHeaders("200 OK", [("Content-Type", "text/css")], protocol="HTTP/1.1"),
                warc_headers_dict={
                    "WARC-Record-ID": record_id("css", n),
                    "WARC-Date": DATE,
                    "WARC-Identified-Payload-Type": "text/css",
                },
                length=len(css),
            )
            writer.write_record(rec)
            meta = writer.create_warc_record(
                url,
                "metadata",
                payload=io.BytesIO(b"fetchTimeMs: 12\r\n"),
                warc_headers_dict={"WARC-Record-ID": record_id(url, -2), "WARC-Date": DATE},
            )
            writer.write_record(meta)
    path.write_bytes(buf.getvalue())


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    entries = build(html_root(argv[0]))
    write(entries, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, {len(entries)} pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

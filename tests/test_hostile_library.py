"""Any name a filesystem or an archive holds runs to the end: a library of names in Latin-1, with `$`, formulas, HTML,
a newline, 250 bytes, and folders reached through symbolic links, run as a user runs it; and the pieces that make it
so, each against hand-made cases: the shown form of a name, clusters.csv's cells, the walk that follows links."""

import collections
import csv
import html.parser
import os
import re
import unicodedata
import zipfile

import matplotlib
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, class_image
from scan import reports
from scan.data import Dataset, find_image_files, load_dataset
from scan.names import display_name, original_name
from scan.settings import UsageError

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
ESCAPED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("IMG_0001.jpg", "IMG_0001.jpg"),
        ("$5 and $10", "$5 and $10"),
        ("été/日本語 photo.jpg", "été/日本語 photo.jpg"),
        (os.fsdecode(b"caf\xe9.jpg"), "caf\\xe9.jpg"),  # a Latin-1 byte that does not decode
        ("caf\\xe9.jpg", "caf\\\\xe9.jpg"),  # the same text typed with a backslash stays apart from it
        ("new\nline\ttab\rreturn", "new\\nline\\ttab\\rreturn"),
        ("\x1b[31mred\x7f\x00", "\\x1b[31mred\\x7f\\x00"),
        ("c1\x85", "c1\\u0085"),  # a C1 control is a character, not the byte 0x85
        ("gpj.\u202eexe", "gpj.\\u202eexe"),  # a right-to-left override
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
        ("tag\U000e0041", "tag\\U000e0041"),
        (
            "\U0001f468\u200d\U0001f469\u200d\U0001f467.jpg",
            "\U0001f468\u200d\U0001f469\u200d\U0001f467.jpg",
        ),  # emoji joined
        (
            "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
            "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
        ),  # a Persian word
    ],
)
def test_a_name_is_shown_readable_on_one_line_and_comes_back(name, shown):
    assert display_name(name) == shown
    assert original_name(shown) == name


def test_random_byte_names_come_back_from_their_shown_form_without_a_control_character():
    rng = np.random.default_rng(0)
    for _ in range(500):
        raw = bytes(rng.integers(1, 256, rng.integers(1, 20)).tolist())
        raw += "é\u202e\u0085😀".encode()[: rng.integers(0, 12)]  # some characters, some cut mid-sequence
        name = os.fsdecode(raw)
        shown = display_name(name)
        assert not [c for c in shown if unicodedata.category(c) in ESCAPED_CATEGORIES and c not in "\u200c\u200d"], (
            shown
        )
        assert os.fsencode(original_name(shown)) == raw


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("cat/0001.jpg", "cat/0001.jpg"),
        ("=cmd|' -C calc'!A0.jpg", "'=cmd|' -C calc'!A0.jpg"),
        ('=HYPERLINK("http:x")', '\'=HYPERLINK("http:x")'),
        ("+1.jpg", "'+1.jpg"),
        ("-2.jpg", "'-2.jpg"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("'quoted", "''quoted"),  # so that reading back is always dropping one leading '
        ("a=b+c", "a=b+c"),
        ("\tx", "\\tx"),  # shown first: a tab at the start is an escape, no longer a tab
        (os.fsdecode(b"=\xff"), "'=\\xff"),
        (7, 7),
        ("0.9812", "0.9812"),
    ],
)
def test_a_csv_cell_is_shown_and_never_starts_a_formula(value, written):
    assert reports.table_cell(value) == written


def read_back(cell):
    """A clusters.csv cell as README says to read it: one leading ' dropped, then the shown form undone."""
    return original_name(cell[1:] if cell.startswith("'") else cell)


def test_clusters_csv_reads_back_to_the_original_names(tmp_path):
    names = ["=1+1.jpg", "'a.jpg", os.fsdecode(b"caf\xe9/x.jpg"), 'q"uote,comma.jpg', "new\nline.jpg", "back\\x.jpg"]
    classes = ["@class", os.fsdecode(b"\xe9t\xe9")]
    dataset = Dataset(np.zeros((6, 2, 2, 3), np.uint8), np.array([0, 1, 0, 1, 0, 1]), classes, "s", names, "r")
    path = tmp_path / "clusters.csv"
    reports.save_cluster_table([("train", dataset, np.tile([[0.25, 0.75]], (6, 1)))], str(path))
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert len(rows) == 7 and len(path.read_text(encoding="utf-8").splitlines()) == 7  # one line a row
    assert [read_back(row[1]) for row in rows[1:]] == names
    assert [read_back(row[4]) for row in rows[1:]] == [classes[i] for i in (0, 1, 0, 1, 0, 1)]
    assert not [cell for row in rows for cell in row if cell.startswith(FORMULA_STARTS)]


def test_figure_titles_are_plain_text_and_matplotlib_is_left_as_it_was(monkeypatch, tmp_path):
    drawn = []
    save = reports.save_figure
    monkeypatch.setattr(reports, "save_figure", lambda figure, path: (drawn.append(figure), save(figure, path)))
    classes = ["a$^$b", "$5 and $10", os.fsdecode(b"caf\xe9")]
    images = np.stack([class_image(i, 0) for i in range(3)])
    reports.plot_prototypes(images, np.arange(3), classes, [[0], [1], [2]], str(tmp_path / "prototypes.png"))
    titles = [axis.title for axis in drawn[0].axes]
    assert [title.get_text() for title in titles] == ["c0: a$^$b", "c1: $5 and $10", "c2: caf\\xe9"]
    assert not any(title.get_parse_math() for title in titles)
    assert matplotlib.rcParams["text.parse_math"]  # only the figures are plain text


def test_the_walk_follows_links_once_each_and_a_loop_is_one_warning(tmp_path, capsys):
    library, elsewhere = tmp_path / "library", tmp_path / "elsewhere"
    for folder in (library / "a", library / "b" / "deep", elsewhere):
        folder.mkdir(parents=True)
    for path in (library / "a" / "1.png", library / "b" / "deep" / "2.png", elsewhere / "3.png"):
        path.write_bytes(b"")
    os.symlink(library / "a", library / "b" / "again")  # a folder walked already
    os.symlink(library, library / "a" / "up")  # loops back to the top
    os.symlink(library / "b", library / "b" / "deep" / "self")  # loops back to a folder above
    os.symlink(elsewhere, library / "c")  # a class folder that lives elsewhere
    os.symlink(library / "a" / "1.png", library / "c-copy.png")  # found before a/1.png, which is then left out
    os.symlink(library / "missing.png", library / "broken.png")  # listed, and found unreadable when decoded
    found = find_image_files(str(library))
    # Each folder's files first, then its sub-folders; the first path in that order keeps a real file.
    assert found == [("broken.png", ""), ("c-copy.png", ""), ("b/deep/2.png", "b/deep"), ("c/3.png", "c")]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings == [
        "warning: a loop of symbolic links: not following 2 links back into a folder above (a/up, b/deep/self)"
    ]


def test_a_zip_member_name_flagged_utf8_that_is_not_is_one_error_line(tmp_path):
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("photos/caf\u00e9/1.png", b"")  # stored as UTF-8, its flag set
    path.write_bytes(path.read_bytes().replace("caf\u00e9".encode(), b"caf\xe9\xe9"))
    with pytest.raises(UsageError, match=r"photos.zip: the archive is corrupt or truncated \(UnicodeDecodeError"):
        load_dataset(str(path), 32, 0, 0)


# The hostile library: class folders and files named as people and old systems name them.
CLASS_NAMES = [
    b"caf\xe9", b"a$^$b", b"$5 and $10", b'=HYPERLINK("http:x")', b"+plus\ttab", b"@at", b"<img src=x onerror=alert(1)>",
    b"new\nline", b"c" * 250,
]  # fmt: skip
FILE_NAMES = [
    b"=cmd|' -C calc'!A0.png", b"\xe9t\xe9.png", b"$x$.png", b"+1.png", b"@sum.png", b"-2.png", b"'quote.png",
    b"<script>alert(1)<\\script>.png", b"tab\there.png", b"new\nline.png", b"esc\x1b[31m.png", b"back\\slash.png",
    b"n" * 246 + b".png",
]  # fmt: skip
TINY = ["--encoder=small", "--representation_epochs=1", "--clustering_epochs=1", "--num_clusters=3", "--k_neighbours=2",
        "--representation_batch_size=8", "--clustering_batch_size=8", "--embedding_batch_size=8", "--sheet_images=4"]  # fmt: skip


def write_image(path, class_id, index):
    """Writes a small PNG of class `class_id` at `path` (bytes); returns its bytes."""
    Image.fromarray(class_image(class_id, index)).save(path, format="PNG")
    with open(path, "rb") as file:
        return file.read()


def write_hostile_library(root, elsewhere):
    """Three images in each of CLASS_NAMES (files named FILE_NAMES, in turn), a class folder that is a symbolic link
    to `elsewhere` (two images, a link to a file already read, a broken link), a link to a class folder already
    read, a loop; returns {the name each readable image should have in clusters.csv: (label, its bytes)}."""
    expected = {}
    for class_id, class_name in enumerate(CLASS_NAMES):
        os.makedirs(os.path.join(root, class_name))
        for index in range(3):
            file_name = FILE_NAMES[(3 * class_id + index) % len(FILE_NAMES)]
            data = write_image(os.path.join(root, class_name, file_name), class_id, index)
            expected[os.fsdecode(class_name + b"/" + file_name)] = (os.fsdecode(class_name), data)
    os.makedirs(elsewhere)
    for index, file_name in enumerate([b"\xff.png", b"@linked.png"]):
        data = write_image(os.path.join(elsewhere, file_name), 1, 10 + index)
        expected[os.fsdecode(b"linked/" + file_name)] = ("linked", data)
    os.symlink(os.path.join(root, CLASS_NAMES[0], FILE_NAMES[0]), os.path.join(elsewhere, b"same-file.png"))
    os.symlink(os.path.join(elsewhere, b"gone.png"), os.path.join(elsewhere, b"broken\x1b[31m.png"))
    os.symlink(elsewhere, os.path.join(root, b"linked"))
    os.symlink(os.path.join(root, CLASS_NAMES[0]), os.path.join(root, b"zz-same-folder"))
    os.symlink(root, os.path.join(root, CLASS_NAMES[1], b"loop"))
    return expected


def write_hostile_zip(path, library):
    """A zip of a top folder holding the library's images, under the library's names where a zip can hold them
    (Unicode: a Latin-1 byte becomes its character) and one member whose name is a raw Latin-1 byte, which
    zipfile reads as cp437; returns {member name as zipfile reads it: its bytes}."""
    members = {}
    with zipfile.ZipFile(path, "w") as archive:
        for name, (_, data) in library.items():
            member = "photos/" + os.fsencode(name).decode("latin-1")
            archive.writestr(member, data)
            members[member] = data
        archive.writestr("photos/latin/caf?.png", members[member])  # its name's last byte set below
    raw = open(path, "rb").read()
    assert raw.count(b"photos/latin/caf?.png") == 2  # in its local header and in the central directory
    with open(path, "wb") as file:  # no checksum covers a name; bit 11 (UTF-8) stays clear: cp437
        file.write(raw.replace(b"photos/latin/caf?.png", b"photos/latin/caf\xe9.png"))
    members["photos/latin/caf\u0398.png"] = members[member]  # 0xe9 in cp437
    return members


class Page(html.parser.HTMLParser):
    """Every element of a page, with its attributes, and the text of its cards."""

    def __init__(self, path):
        super().__init__()
        self.elements, self.card_texts, self.in_card = [], [], False
        with open(path, encoding="utf-8") as file:
            self.feed(file.read())

    def handle_starttag(self, tag, attributes):
        self.elements.append((tag, dict(attributes)))
        if tag == "article":
            self.in_card, self.card_texts = True, [*self.card_texts, ""]

    def handle_endtag(self, tag):
        self.in_card = self.in_card and tag != "article"

    def handle_data(self, data):
        if self.in_card:
            self.card_texts[-1] += data


PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "p", "span", "ul", "li", "strong",
             "section", "article", "a", "img", "figure", "figcaption"}  # fmt: skip


def check_page(path, num_images, labels):
    """Only the page's own elements (none made from a name), card sizes that add up to every image, and each
    majority label shown as display_name shows it."""
    page = Page(path)
    assert {tag for tag, _ in page.elements} <= PAGE_TAGS
    assert not [attributes for _, attributes in page.elements if set(attributes) - {"href", "src", "alt", "loading",
                "class", "id", "lang", "charset", "name", "content"}]  # fmt: skip
    assert not [attributes for tag, attributes in page.elements if tag == "img" and attributes["src"] == "x"]
    sizes = [int(text.split("Cluster ")[1].split()[1]) for text in page.card_texts]
    assert sum(sizes) == num_images
    shown = {text.split("majority: ")[1].split(" · ")[0] for text in page.card_texts if "majority: " in text}
    assert shown <= {display_name(label) for label in labels}


def controls(printed):
    """The characters of `printed` that act on a terminal instead of being seen (a line's end aside)."""
    return [c for c in printed if c != "\n" and unicodedata.category(c) in ESCAPED_CATEGORIES]


def read_table(path):
    """clusters.csv (or assigned.csv) read as README says: [{column: cell}], and every cell starts no formula."""
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert not [cell for row in rows for cell in row.values() if cell.startswith(FORMULA_STARTS)]
    return rows


def readme_names(path):
    """The names that README's way of reading clusters.csv back gives for the file at `path`."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    code = re.search(r"```python\n(from scan.names import original_name.*?)```", readme, re.DOTALL).group(1)
    namespace = {"csv": csv}
    exec(code.replace('"outputs/clusters.csv"', repr(str(path))), namespace)
    return namespace["names"]


def sorted_files(target):
    """The bytes of every file laid out in target/cluster-NN/."""
    return [
        open(os.path.join(target, folder, name), "rb").read()
        for folder in os.listdir(target)
        if folder.startswith("cluster-")
        for name in os.listdir(os.path.join(target, folder))
    ]


def test_a_hostile_library_and_a_zip_of_it_run_to_the_end(tmp_path, run_here):
    library = write_hostile_library(os.fsencode(tmp_path / "library"), os.fsencode(tmp_path / "elsewhere"))
    out, target = tmp_path / "out", tmp_path / "sorted"
    arguments = [f"--data={tmp_path / 'library'}", f"--output_dir={out}", f"--sort_into={target}", *TINY]
    finished = run_here(arguments, tmp_path)
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert lines[-1].startswith(f"RESULT split=train images={len(library)} clusters=3 acc=")
    assert not controls(finished.stdout)
    assert [line for line in lines if "loop of symbolic links" in line] == [
        "warning: a loop of symbolic links: not following 1 link back into a folder above (a$^$b/loop)"
    ]
    assert f"warning: skipped 1 unreadable image files of {len(library) + 1} (linked/broken\\x1b[31m.png)" in lines
    classes = sorted({label for label, _ in library.values()})
    assert f"{len(classes)} classes: {', '.join(display_name(name) for name in classes)}" in lines
    rows = read_table(out / "clusters.csv")
    assert sorted(read_back(row["source"]) for row in rows) == sorted(library)
    assert sorted(readme_names(out / "clusters.csv")) == sorted(library)
    assert all(read_back(row["label"]) == library[read_back(row["source"])][0] for row in rows)
    check_page(out / "report.html", len(library), {label for label, _ in library.values()})
    assert sorted(sorted_files(target)) == sorted(data for _, data in library.values())

    # The same images in a zip, put into the clusters learned (nothing trained), and sorted: extracted.
    members = write_hostile_zip(tmp_path / "library.zip", library)
    target = tmp_path / "sorted-zip"
    assigned = run_here(
        [*arguments[:2], f"--sort_into={target}", f"--assign_data={tmp_path / 'library.zip'}", *TINY], tmp_path
    )
    assert assigned.returncode == 0, assigned.stderr
    assert not controls(assigned.stdout)
    assert assigned.stdout.splitlines()[-1] == f"RESULT split=assigned images={len(members)} clusters=3"
    rows = read_table(out / "assigned.csv")
    assert sorted(read_back(row["source"]) for row in rows) == sorted(members)
    check_page(out / "assigned.html", len(members), set())
    assert collections.Counter(sorted_files(target)) == collections.Counter(members.values())

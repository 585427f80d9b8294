"""llamaforge's labelled code-scanner set (Apache-2.0, written for this project): insecure snippets and their
fixed counterparts. `python scripts/guard_data/code_snippets.py` writes src/llamaforge/safety/data/code_snippets.jsonl.

split "dev": pairs written together with the rules; split "test": pairs written afterwards, held out (the rules
were not changed after the test pairs were first scored; see the README next to the JSONL for that score).
"""
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "src" / "llamaforge" / "safety" / "data" / "code_snippets.jsonl"

# (split, language, cwe, insecure, secure)
PAIRS = [
    # ------------------------------------------------------------------ dev
    ("dev", "python", "CWE-78", '''import os

def ping(host):
    os.system("ping -c 1 " + host)
''', '''import subprocess

def ping(host):
    subprocess.run(["ping", "-c", "1", host], check=True)
'''),
    ("dev", "python", "CWE-89", '''def find_user(cur, name):
    cur.execute(f"SELECT * FROM users WHERE name = '{name}'")
    return cur.fetchone()
''', '''def find_user(cur, name):
    cur.execute("SELECT * FROM users WHERE name = ?", (name,))
    return cur.fetchone()
'''),
    ("dev", "python", "CWE-502", '''import pickle

def load_session(blob):
    return pickle.loads(blob)
''', '''import json

def load_session(blob):
    return json.loads(blob)
'''),
    ("dev", "python", "CWE-502", '''import yaml

with open("config.yml") as f:
    cfg = yaml.load(f)
''', '''import yaml

with open("config.yml") as f:
    cfg = yaml.safe_load(f)
'''),
    ("dev", "python", "CWE-295", '''import requests

r = requests.get(url, verify=False)
''', '''import requests

r = requests.get(url, timeout=10)
'''),
    ("dev", "c", "CWE-120", '''#include <string.h>
void greet(const char *name) {
    char buf[16];
    strcpy(buf, name);
}
''', '''#include <stdio.h>
void greet(const char *name) {
    char buf[16];
    snprintf(buf, sizeof buf, "%s", name);
}
'''),
    ("dev", "c", "CWE-242", '''#include <stdio.h>
int main(void) {
    char line[64];
    gets(line);
    return 0;
}
''', '''#include <stdio.h>
int main(void) {
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
    return 0;
}
'''),
    ("dev", "c", "CWE-134", '''#include <stdio.h>
void log_msg(const char *msg) {
    printf(msg);
}
''', '''#include <stdio.h>
void log_msg(const char *msg) {
    printf("%s", msg);
}
'''),
    ("dev", "cpp", "CWE-78", '''#include <cstdlib>
#include <string>
void open_file(const std::string &path) {
    std::string cmd = "xdg-open " + path;
    std::system(cmd.c_str());
}
''', '''#include <unistd.h>
#include <string>
void open_file(const std::string &path) {
    execlp("xdg-open", "xdg-open", path.c_str(), (char *)nullptr);
}
'''),
    ("dev", "javascript", "CWE-95", '''function calc(expr) {
  return eval(expr);
}
''', '''const { evaluate } = require("mathjs");
function calc(expr) {
  return evaluate(expr);
}
'''),
    ("dev", "javascript", "CWE-79", '''function show(comment) {
  document.getElementById("out").innerHTML = comment;
}
''', '''function show(comment) {
  document.getElementById("out").textContent = comment;
}
'''),
    ("dev", "javascript", "CWE-78", '''const { exec } = require("child_process");
app.get("/dig", (req, res) => {
  exec(`dig ${req.query.host}`, (err, out) => res.send(out));
});
''', '''const { execFile } = require("child_process");
app.get("/dig", (req, res) => {
  execFile("dig", [String(req.query.host)], (err, out) => res.send(out));
});
'''),
    ("dev", "typescript", "CWE-89", '''async function byId(db: Pool, id: string) {
  return db.query("SELECT * FROM items WHERE id = " + id);
}
''', '''async function byId(db: Pool, id: string) {
  return db.query("SELECT * FROM items WHERE id = $1", [id]);
}
'''),
    ("dev", "java", "CWE-89", '''public User find(Connection c, String name) throws SQLException {
    Statement st = c.createStatement();
    ResultSet rs = st.executeQuery("SELECT * FROM users WHERE name = '" + name + "'");
    return map(rs);
}
''', '''public User find(Connection c, String name) throws SQLException {
    PreparedStatement st = c.prepareStatement("SELECT * FROM users WHERE name = ?");
    st.setString(1, name);
    return map(st.executeQuery());
}
'''),
    ("dev", "java", "CWE-502", '''public Object read(InputStream in) throws Exception {
    ObjectInputStream ois = new ObjectInputStream(in);
    return ois.readObject();
}
''', '''public Order read(InputStream in) throws Exception {
    return new ObjectMapper().readValue(in, Order.class);
}
'''),
    ("dev", "java", "CWE-328", '''String digest(String s) throws Exception {
    MessageDigest md = MessageDigest.getInstance("MD5");
    return hex(md.digest(s.getBytes(StandardCharsets.UTF_8)));
}
''', '''String digest(String s) throws Exception {
    MessageDigest md = MessageDigest.getInstance("SHA-256");
    return hex(md.digest(s.getBytes(StandardCharsets.UTF_8)));
}
'''),
    ("dev", "go", "CWE-78", '''func run(name string) error {
	return exec.Command("sh", "-c", "convert "+name+" out.png").Run()
}
''', '''func run(name string) error {
	return exec.Command("convert", name, "out.png").Run()
}
'''),
    ("dev", "go", "CWE-295", '''client := &http.Client{Transport: &http.Transport{
	TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
}}
''', '''client := &http.Client{Transport: &http.Transport{
	TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS12},
}}
'''),
    ("dev", "php", "CWE-89", '''<?php
$id = $_GET['id'];
$res = mysqli_query($conn, "SELECT * FROM posts WHERE id = $id");
''', '''<?php
$stmt = $conn->prepare("SELECT * FROM posts WHERE id = ?");
$stmt->bind_param("i", $_GET['id']);
$stmt->execute();
'''),
    ("dev", "php", "CWE-79", '''<?php
echo "Hello " . $_GET['name'];
''', '''<?php
echo "Hello " . htmlspecialchars($_GET['name'], ENT_QUOTES, 'UTF-8');
'''),
    ("dev", "shell", "CWE-494", '''#!/bin/sh
curl -fsSL https://example.com/install.sh | sh
''', '''#!/bin/sh
curl -fsSLo install.sh https://example.com/install.sh
sha256sum -c install.sh.sha256 && sh install.sh
'''),
    ("dev", "shell", "CWE-295", '''#!/bin/bash
curl -k https://internal.example/api/health
''', '''#!/bin/bash
curl --cacert /etc/ssl/internal-ca.pem https://internal.example/api/health
'''),
    # ------------------------------------------------------------------ test (held out)
    ("test", "python", "CWE-78", '''import subprocess

def archive(folder):
    subprocess.call("tar czf backup.tgz " + folder, shell=True)
''', '''import subprocess

def archive(folder):
    subprocess.call(["tar", "czf", "backup.tgz", folder])
'''),
    ("test", "python", "CWE-95", '''def apply_rule(rule_text, row):
    return eval(rule_text, {"row": row})
''', '''import ast

def parse_limit(text):
    return ast.literal_eval(text)
'''),
    ("test", "python", "CWE-338", '''import random, string

def reset_token():
    return "".join(random.choice(string.ascii_letters) for _ in range(32))
''', '''import secrets

def reset_token():
    return secrets.token_urlsafe(32)
'''),
    ("test", "python", "CWE-89", '''def delete_order(conn, order_id):
    conn.execute("DELETE FROM orders WHERE id = %s" % order_id)
''', '''def delete_order(conn, order_id):
    conn.execute("DELETE FROM orders WHERE id = %s", (order_id,))
'''),
    ("test", "python", "CWE-328", '''import hashlib

def store_password(pw):
    return hashlib.md5(pw.encode()).hexdigest()
''', '''import hashlib, os

def store_password(pw):
    salt = os.urandom(16)
    return salt + hashlib.scrypt(pw.encode(), salt=salt, n=2**14, r=8, p=1)
'''),
    ("test", "c", "CWE-120", '''#include <stdio.h>
void read_name(void) {
    char name[32];
    scanf("%s", name);
}
''', '''#include <stdio.h>
void read_name(void) {
    char name[32];
    scanf("%31s", name);
}
'''),
    ("test", "c", "CWE-120", '''#include <string.h>
void join(char *dst, const char *a, const char *b) {
    strcpy(dst, a);
    strcat(dst, b);
}
''', '''#include <stdio.h>
void join(char *dst, size_t n, const char *a, const char *b) {
    snprintf(dst, n, "%s%s", a, b);
}
'''),
    ("test", "cpp", "CWE-78", '''#include <cstdio>
#include <string>
std::string lookup(const std::string &domain) {
    FILE *p = popen(("whois " + domain).c_str(), "r");
    return read_all(p);
}
''', '''#include <string>
std::string lookup(const std::string &domain) {
    return run_program({"whois", domain});
}
'''),
    ("test", "javascript", "CWE-295", '''const https = require("https");
const agent = new https.Agent({ rejectUnauthorized: false });
''', '''const https = require("https");
const agent = new https.Agent({ ca: fs.readFileSync("ca.pem") });
'''),
    ("test", "javascript", "CWE-22", '''app.get("/files", (req, res) => {
  res.sendFile(req.query.name, { root: "/srv/files" });
});
''', '''app.get("/files", (req, res) => {
  const name = path.basename(String(req.query.name));
  res.sendFile(name, { root: "/srv/files" });
});
'''),
    ("test", "typescript", "CWE-79", '''function render(el: HTMLElement, user: User) {
  el.innerHTML = `<b>${user.name}</b>`;
}
''', '''function render(el: HTMLElement, user: User) {
  const b = document.createElement("b");
  b.textContent = user.name;
  el.replaceChildren(b);
}
'''),
    ("test", "javascript", "CWE-89", '''async function search(q) {
  return pool.query(`SELECT * FROM products WHERE name LIKE '%${q}%'`);
}
''', '''async function search(q) {
  return pool.query("SELECT * FROM products WHERE name LIKE $1", [`%${q}%`]);
}
'''),
    ("test", "java", "CWE-78", '''public void thumbnail(String file) throws IOException {
    Runtime.getRuntime().exec("convert " + file + " -resize 64x64 thumb.png");
}
''', '''public void thumbnail(String file) throws IOException {
    new ProcessBuilder("convert", file, "-resize", "64x64", "thumb.png").start();
}
'''),
    ("test", "java", "CWE-327", '''Cipher c = Cipher.getInstance("DES/ECB/PKCS5Padding");
c.init(Cipher.ENCRYPT_MODE, key);
''', '''Cipher c = Cipher.getInstance("AES/GCM/NoPadding");
c.init(Cipher.ENCRYPT_MODE, key, new GCMParameterSpec(128, iv));
'''),
    ("test", "java", "CWE-338", '''String sessionId() {
    Random r = new Random();
    return Long.toHexString(r.nextLong());
}
''', '''String sessionId() {
    SecureRandom r = new SecureRandom();
    return Long.toHexString(r.nextLong());
}
'''),
    ("test", "go", "CWE-89", '''func user(db *sql.DB, name string) (*sql.Rows, error) {
	return db.Query(fmt.Sprintf("SELECT * FROM users WHERE name = '%s'", name))
}
''', '''func user(db *sql.DB, name string) (*sql.Rows, error) {
	return db.Query("SELECT * FROM users WHERE name = ?", name)
}
'''),
    ("test", "go", "CWE-328", '''import "crypto/md5"

func fingerprint(b []byte) [16]byte {
	return md5.Sum(b)
}
''', '''import "crypto/sha256"

func fingerprint(b []byte) [32]byte {
	return sha256.Sum256(b)
}
'''),
    ("test", "go", "CWE-338", '''import "math/rand"

func otp() int {
	return rand.Intn(1000000)
}
''', '''import "crypto/rand"

func otp() (int64, error) {
	n, err := rand.Int(rand.Reader, big.NewInt(1000000))
	return n.Int64(), err
}
'''),
    ("test", "php", "CWE-78", '''<?php
$file = $_POST['file'];
system("gzip " . $file);
''', '''<?php
$file = $_POST['file'];
system("gzip " . escapeshellarg($file));
'''),
    ("test", "php", "CWE-98", '''<?php
include($_GET['page'] . ".php");
''', '''<?php
$pages = ["home", "about"];
$page = in_array($_GET['page'], $pages, true) ? $_GET['page'] : "home";
include(__DIR__ . "/pages/" . $page . ".php");
'''),
    ("test", "php", "CWE-502", '''<?php
$prefs = unserialize($_COOKIE['prefs']);
''', '''<?php
$prefs = json_decode($_COOKIE['prefs'], true);
'''),
    ("test", "shell", "CWE-95", '''#!/bin/bash
read -r cmd
eval "$cmd"
''', '''#!/bin/bash
read -r choice
case "$choice" in start|stop) systemctl "$choice" app ;; esac
'''),
    ("test", "shell", "CWE-732", '''#!/bin/sh
mkdir -p /srv/uploads
chmod -R 777 /srv/uploads
''', '''#!/bin/sh
mkdir -p /srv/uploads
chown -R www-data:www-data /srv/uploads && chmod -R 750 /srv/uploads
'''),
    ("test", "shell", "CWE-494", '''#!/bin/bash
wget -qO- https://get.example.dev/setup | sudo bash
''', '''#!/bin/bash
wget -qO setup.sh https://get.example.dev/setup
gpg --verify setup.sh.asc setup.sh && sudo bash setup.sh
'''),
]


def main():
    OUT.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(OUT, "w", encoding="utf-8") as f:
        for k, (split, lang, cwe, bad, good) in enumerate(PAIRS):
            for label, code in (("insecure", bad), ("secure", good)):
                f.write(json.dumps({"id": f"{lang}-{k:02d}-{label}", "pair": k, "language": lang,
                                    "label": label, "cwe": cwe if label == "insecure" else None,
                                    "split": split, "code": code}) + "\n")
                n += 1
    print(f"{n} snippets -> {OUT}")


if __name__ == "__main__":
    main()

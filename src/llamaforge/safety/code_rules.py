"""The fast pattern pass of the code scanner: insecure-code rules per language, each tagged with its CWE.

Rules are regular expressions over one line of code with comments blanked out. String literals are kept (a SQL
string built with `+` is the finding) but a match must start in code, so prose in a string is not a finding. Severity "error" means the construct is dangerous as written (command or SQL
built from data, deserialising untrusted bytes, TLS verification off) and blocks; "warning" means it is risky
depending on use (weak hashes, non-cryptographic randomness) and annotates. The CWE numbers follow MITRE's list
and the choices CyberSecEval's insecure code detector made for the same constructs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

LANGUAGES = ("python", "c", "cpp", "javascript", "typescript", "java", "go", "php", "shell")


@dataclass(frozen=True)
class Rule:
    id: str
    languages: tuple[str, ...]
    pattern: re.Pattern
    cwe: str
    severity: str          # "error" | "warning"
    message: str
    unless: re.Pattern | None = None   # the line is fine when this also matches (e.g. a safe loader)
    in_strings: bool = False           # may start inside a string literal (embedded keys); others must be code


def _r(id_, langs, pattern, cwe, severity, message, unless=None, flags=0, in_strings=False) -> Rule:
    langs = tuple(langs.split()) if isinstance(langs, str) else tuple(langs)
    return Rule(id_, langs, re.compile(pattern, flags), cwe, severity, message,
                re.compile(unless, flags) if unless else None, in_strings)


C_FAMILY = "c cpp"
JS = "javascript typescript"
ALL = " ".join(LANGUAGES)
_SECRETWORD = r"(?i:password|passwd|secret|api[_-]?key|token|private[_-]?key|access[_-]?key)"

RULES: tuple[Rule, ...] = (
    # ---------------------------------------------------------------- every language: secrets in source
    _r("hardcoded-secret", ALL, _SECRETWORD + r"\w*\s*[:=]\s*[\"'][^\"'\s]{8,}[\"']", "CWE-798", "warning",
       "a credential is written into the source; read it from the environment or a secret store",
       unless=r"(?i)(example|changeme|your[_-]|<|\$\{|xxxx|placeholder|getenv|environ)"),
    _r("aws-access-key", ALL, r"\bAKIA[0-9A-Z]{16}\b", "CWE-798", "error", "an AWS access key id is embedded",
       in_strings=True),
    _r("private-key", ALL, r"-----BEGIN (RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----", "CWE-321", "error",
       "a private key is embedded in the code", in_strings=True),

    # ---------------------------------------------------------------- Python
    _r("py-eval", "python", r"(?<![\w.])(eval|exec)\s*\((?!\s*[\"'][^\"']*[\"']\s*\))", "CWE-95", "error",
       "eval/exec of a non-literal runs whatever code the data holds; parse it (ast.literal_eval, json) instead"),
    _r("py-shell-true", "python", r"subprocess\.\w+\(.*shell\s*=\s*True", "CWE-78", "error",
       "shell=True hands the command line to /bin/sh: pass an argument list without a shell"),
    _r("py-os-system", "python", r"\bos\.(system|popen)\s*\(\s*(f[\"']|[^)\"']*\+|[\"'][^\"']*[\"']\s*(%|\+|\.format))",
       "CWE-78", "error", "a shell command is built from data; use subprocess.run([...]) with an argument list"),
    _r("py-os-system-any", "python", r"\bos\.(system|popen)\s*\(", "CWE-78", "warning",
       "os.system/os.popen run a shell; prefer subprocess.run with an argument list",
       unless=r"\bos\.(system|popen)\s*\(\s*(f[\"']|[^)\"']*\+|[\"'][^\"']*[\"']\s*(%|\+|\.format))"),
    _r("py-pickle", "python", r"\b(c?pickle|dill|shelve|marshal)\.(loads?|open|Unpickler)\s*\(", "CWE-502", "error",
       "unpickling runs code chosen by whoever wrote the bytes; use JSON or another data-only format"),
    _r("py-yaml-load", "python", r"\byaml\.(load|load_all|unsafe_load|full_load)\s*\(", "CWE-502", "error",
       "yaml.load without SafeLoader can construct arbitrary objects; use yaml.safe_load",
       unless=r"Loader\s*=\s*(yaml\.)?(C?SafeLoader|BaseLoader)"),
    _r("py-torch-load", "python", r"\btorch\.load\s*\(", "CWE-502", "warning",
       "torch.load unpickles; pass weights_only=True for files you did not write",
       unless=r"weights_only\s*=\s*True"),
    _r("py-sql-format", "python",
       r"\.(execute|executemany|executescript|raw)\s*\(\s*(f[\"']|[\"'][^\"']*[\"']\s*(%|\+|\.format)|\w+\s*\+)",
       "CWE-89", "error", "SQL built by string formatting; pass parameters separately (cursor.execute(sql, params))"),
    _r("py-weak-hash", "python", r"\bhashlib\.(md5|sha1)\s*\(|hashlib\.new\s*\(\s*[\"'](md5|sha1)[\"']", "CWE-328",
       "warning", "MD5/SHA-1 are broken for security uses; use hashlib.sha256 (or a password hash)",
       unless=r"usedforsecurity\s*=\s*False"),
    _r("py-tls-off", "python", r"verify\s*=\s*False|ssl\._create_unverified_context|CERT_NONE|check_hostname\s*=\s*False",
       "CWE-295", "error", "TLS certificate verification is turned off"),
    _r("py-insecure-random", "python", r"\brandom\.(random|randint|randrange|choice|choices|getrandbits)\s*\(.*" ,
       "CWE-338", "warning", "the random module is predictable; use the secrets module for tokens and keys",
       unless=r"^(?!.*(?i:token|password|secret|key|salt|nonce|otp|session)).*$"),
    _r("py-flask-debug", "python", r"\.run\s*\(.*debug\s*=\s*True", "CWE-489", "warning",
       "the debug server executes code sent from the browser; never enable it outside development"),
    _r("py-mktemp", "python", r"\btempfile\.mktemp\s*\(", "CWE-377", "warning",
       "mktemp returns a name another process can claim first; use NamedTemporaryFile or mkstemp"),
    _r("py-xxe", "python", r"resolve_entities\s*=\s*True|XMLParser\s*\(.*no_network\s*=\s*False", "CWE-611", "error",
       "the XML parser resolves external entities (XXE)"),
    _r("py-jinja-autoescape", "python", r"\bEnvironment\s*\(.*autoescape\s*=\s*False", "CWE-79", "warning",
       "templates render without HTML escaping"),

    # ---------------------------------------------------------------- C / C++
    _r("c-gets", C_FAMILY, r"(?<![\w.])gets\s*\(", "CWE-242", "error",
       "gets cannot bound its input; use fgets(buf, sizeof buf, stdin)"),
    _r("c-strcpy", C_FAMILY, r"(?<![\w.])(strcpy|strcat|wcscpy|wcscat|lstrcpy|StrCpy)\s*\(", "CWE-120", "error",
       "unbounded copy into a fixed buffer; use snprintf or a length-checked copy"),
    _r("c-sprintf", C_FAMILY, r"(?<![\w.])v?sprintf\s*\(", "CWE-120", "warning",
       "sprintf does not know the buffer size; use snprintf"),
    _r("c-scanf-s", C_FAMILY, r"(?<![\w.])(f|s)?scanf\s*\((\s*\w+\s*,)?\s*\"[^\"]*%s", "CWE-120", "error",
       "%s without a width reads past the buffer; give a width (%63s)"),
    _r("c-format-string", C_FAMILY,
       r"(?<![\w.])(printf|syslog\s*\(\s*\w+\s*,|fprintf\s*\(\s*\w+\s*,|snprintf\s*\(\s*\w+\s*,\s*[\w\s]+,)\s*\(?\s*"
       r"[A-Za-z_][\w.\->\[\]]*\s*\)", "CWE-134", "error",
       "data used as a format string; pass it as an argument (printf(\"%s\", s))"),
    _r("c-system", C_FAMILY, r"(?<![\w.])(system|popen|execl|execlp)\s*\(\s*(?!\")", "CWE-78", "error",
       "a shell command built from data; use execve with an argument vector"),
    _r("c-system-literal", C_FAMILY, r"(?<![\w.])(system|popen)\s*\(\s*\"", "CWE-78", "warning",
       "system/popen run a shell; prefer fork/execve"),
    _r("c-rand", C_FAMILY, r"(?<![\w.])(s?rand|random)\s*\(", "CWE-338", "warning",
       "rand() is predictable; use getrandom/arc4random or a CSPRNG for anything secret"),
    _r("c-weak-crypto", C_FAMILY, r"\b(MD5_Init|MD5\s*\(|SHA1_Init|SHA1\s*\(|EVP_md5|EVP_sha1|DES_\w+|EVP_des_\w+|"
       r"EVP_rc4|EVP_\w+_ecb)\b", "CWE-327", "warning", "a broken hash or cipher (MD5, SHA-1, DES, RC4, ECB)"),
    _r("c-tmpnam", C_FAMILY, r"(?<![\w.])(tmpnam|tempnam|mktemp)\s*\(", "CWE-377", "warning",
       "predictable temporary name; use mkstemp"),
    _r("c-alloca", C_FAMILY, r"(?<![\w.])alloca\s*\(", "CWE-770", "warning",
       "alloca with a data-dependent size can overflow the stack"),
    _r("c-malloc-mul", C_FAMILY, r"(?<![\w.])malloc\s*\([^;]*\*[^;]*\)", "CWE-190", "warning",
       "a multiplied allocation size can overflow; use calloc(n, size) or check the product",
       unless=r"sizeof\s*\(\s*\w+\s*\)\s*\*\s*\d+\s*\)|\d+\s*\*\s*sizeof"),

    # ---------------------------------------------------------------- JavaScript / TypeScript
    _r("js-eval", JS, r"(?<![\w.])eval\s*\(|new\s+Function\s*\(", "CWE-95", "error",
       "eval / new Function run strings as code"),
    _r("js-string-timer", JS, r"\bset(Timeout|Interval)\s*\(\s*[\"'`]", "CWE-95", "warning",
       "a string passed to setTimeout/setInterval is evaluated as code"),
    _r("js-innerhtml", JS, r"\.(innerHTML|outerHTML)\s*\+?=\s*(?![\"'`][^\"'`$]*[\"'`]\s*;?\s*$)|document\.write(ln)?\s*\(",
       "CWE-79", "error", "HTML built from data is injected into the page; set textContent or sanitize"),
    _r("js-dangerous-html", JS, r"dangerouslySetInnerHTML", "CWE-79", "warning",
       "dangerouslySetInnerHTML bypasses React's escaping"),
    _r("js-exec", JS, r"\b(exec|execSync|spawn|spawnSync)\s*\(\s*(`[^`]*\$\{|[\"'][^\"']*[\"']\s*\+|\w+\s*\+)",
       "CWE-78", "error", "a shell command built from data; use execFile/spawn with an argument array"),
    _r("js-sql", JS, r"\.(query|execute|raw)\s*\(\s*(`[^`]*\$\{|[\"'][^\"']*[\"']\s*\+)", "CWE-89", "error",
       "SQL built from data; use placeholders (query(sql, [values]))"),
    _r("js-tls-off", JS, r"rejectUnauthorized\s*:\s*false|NODE_TLS_REJECT_UNAUTHORIZED\s*\]?\s*=\s*[\"']?0",
       "CWE-295", "error", "TLS certificate verification is turned off"),
    _r("js-weak-hash", JS, r"createHash\s*\(\s*[\"'](md5|sha1)[\"']", "CWE-328", "warning",
       "MD5/SHA-1 are broken for security uses"),
    _r("js-insecure-random", JS, r"Math\.random\s*\(", "CWE-338", "warning",
       "Math.random is predictable; use crypto.randomBytes / crypto.getRandomValues for secrets",
       unless=r"^(?!.*(?i:token|password|secret|key|salt|nonce|otp|session|id\b)).*$"),
    _r("js-path-traversal", JS, r"(sendFile|readFile(Sync)?|createReadStream)\s*\(\s*(req\.|`[^`]*\$\{req\.|"
       r"[\"'][^\"']*[\"']\s*\+\s*req\.)", "CWE-22", "error",
       "a file path taken from the request can reach any file; resolve it and check it stays in the root"),
    _r("js-cors-any", JS, r"Access-Control-Allow-Origin[\"']?\s*[,:]\s*[\"']\*|origin\s*:\s*[\"']\*[\"']", "CWE-942",
       "warning", "any origin may read the responses"),

    # ---------------------------------------------------------------- Java
    _r("java-sql", "java", r"\.(executeQuery|executeUpdate|execute|addBatch|prepareStatement)\s*\(\s*\"[^\"]*\"\s*\+",
       "CWE-89", "error", "SQL concatenated with data; use a PreparedStatement with ? parameters"),
    _r("java-exec", "java", r"Runtime\.getRuntime\(\)\.exec\s*\((?!\s*new\s+String\[\])|new\s+ProcessBuilder\s*\(.*\+",
       "CWE-78", "error", "a command line built from data; pass the arguments as an array"),
    _r("java-deserialize", "java", r"new\s+ObjectInputStream\s*\(|\bXMLDecoder\s*\(|\.readObject\s*\(\s*\)", "CWE-502",
       "error", "Java deserialisation of untrusted bytes can run code; use a data format or an allow-list filter",
       unless=r"setObjectInputFilter|ValidatingObjectInputStream"),
    _r("java-weak-hash", "java", r"MessageDigest\.getInstance\s*\(\s*\"(MD5|SHA-?1|MD2)\"", "CWE-328", "warning",
       "MD5/SHA-1 are broken for security uses"),
    _r("java-weak-cipher", "java", r"Cipher\.getInstance\s*\(\s*\"(DES|DESede|RC4|RC2|Blowfish|AES\"|[^\"]*/ECB/)",
       "CWE-327", "warning", "a weak cipher or ECB mode (AES alone means AES/ECB)"),
    _r("java-random", "java", r"new\s+(java\.util\.)?Random\s*\(", "CWE-338", "warning",
       "java.util.Random is predictable; use SecureRandom for secrets"),
    _r("java-trust-all", "java", r"ALLOW_ALL_HOSTNAME_VERIFIER|NoopHostnameVerifier|setHostnameVerifier\s*\(.*->\s*true|"
       r"checkServerTrusted\s*\([^)]*\)\s*(throws\s+\w+\s*)?\{\s*\}", "CWE-295", "error",
       "TLS certificate or host-name checks are disabled"),
    _r("java-xxe", "java", r"(DocumentBuilderFactory|SAXParserFactory|XMLInputFactory)\.newInstance\s*\(", "CWE-611",
       "warning", "XML parsers resolve external entities unless disallow-doctype-decl / secure processing is set"),

    # ---------------------------------------------------------------- Go
    _r("go-exec-shell", "go", r"exec\.Command(Context)?\s*\((ctx\s*,\s*)?\"(sh|bash|cmd|/bin/sh|/bin/bash)\"\s*,\s*\"(-c|/c)\"",
       "CWE-78", "error", "a shell runs a command line; call exec.Command with the program and its arguments"),
    _r("go-exec-format", "go", r"exec\.Command(Context)?\s*\(.*(fmt\.Sprintf|\+\s*\w)", "CWE-78", "error",
       "a command built by string formatting"),
    _r("go-sql", "go", r"\.(Query|QueryRow|Exec|QueryContext|QueryRowContext|ExecContext)\s*\((ctx\s*,\s*)?"
       r"(fmt\.Sprintf|\"[^\"]*\"\s*\+)", "CWE-89", "error", "SQL built from data; use ? / $1 placeholders"),
    _r("go-tls-off", "go", r"InsecureSkipVerify\s*:\s*true", "CWE-295", "error", "TLS verification is turned off"),
    _r("go-weak-crypto", "go", r"\b(md5|sha1)\.(New|Sum)\s*\(|\"crypto/(des|rc4|md5|sha1)\"", "CWE-328", "warning",
       "MD5/SHA-1/DES/RC4 are broken for security uses", in_strings=True),  # import paths are strings
    _r("go-math-rand", "go", r"\"math/rand(/v2)?\"", "CWE-338", "warning",
       "math/rand is predictable; use crypto/rand for secrets", in_strings=True),
    _r("go-template-html", "go", r"template\.(HTML|JS|URL)\s*\(", "CWE-79", "warning",
       "template.HTML marks data as safe HTML, bypassing escaping"),
    _r("go-file-perm", "go", r"os\.(WriteFile|OpenFile|Chmod|Mkdir|MkdirAll)\s*\(.*\b0?o?777\b", "CWE-732",
       "warning", "world-writable permissions"),

    # ---------------------------------------------------------------- PHP
    _r("php-exec", "php", r"(?<![\w>])(system|exec|shell_exec|passthru|popen|proc_open)\s*\([^;]*\$|`[^`]*\$\w+[^`]*`",
       "CWE-78", "error", "a shell command contains a variable; use escapeshellarg or avoid the shell",
       unless=r"escapeshellarg\s*\("),
    _r("php-eval", "php", r"(?<![\w>])eval\s*\(|assert\s*\(\s*\$|preg_replace\s*\(\s*[\"'](.).*\1[a-z]*e[a-z]*[\"']|"
       r"create_function\s*\(", "CWE-95", "error", "code evaluated from a string"),
    _r("php-sql", "php", r"(mysql_query|mysqli_query|pg_query|->query|->exec)\s*\([^;]*(\$_(GET|POST|REQUEST|COOKIE)|"
       r"[\"'][^\"']*(\.\s*\$|\$\w+|\{\$))", "CWE-89", "error",
       "SQL contains request data; use prepared statements with bound parameters"),
    _r("php-include", "php", r"\b(include|require)(_once)?\s*\(?\s*[^;]*\$_(GET|POST|REQUEST|COOKIE)", "CWE-98", "error",
       "a file to include is chosen by the request (remote/local file inclusion)"),
    _r("php-xss", "php", r"\b(echo|print)\b[^;]*\$_(GET|POST|REQUEST|COOKIE|SERVER)", "CWE-79", "error",
       "request data printed without htmlspecialchars", unless=r"htmlspecialchars|htmlentities|intval\s*\("),
    _r("php-unserialize", "php", r"\bunserialize\s*\(\s*\$", "CWE-502", "error",
       "unserialize of data can instantiate arbitrary objects; use json_decode",
       unless=r"allowed_classes\s*=>\s*false"),
    _r("php-weak-hash", "php", r"\b(md5|sha1)\s*\(\s*\$\w*(pass|pwd)", "CWE-916", "error",
       "passwords hashed with MD5/SHA-1; use password_hash"),
    _r("php-rand", "php", r"\b(rand|mt_rand|uniqid)\s*\(", "CWE-338", "warning",
       "predictable randomness; use random_bytes / random_int for secrets",
       unless=r"^(?!.*(?i:token|password|secret|key|salt|nonce|otp|session)).*$"),

    # ---------------------------------------------------------------- shell
    _r("sh-curl-pipe", "shell", r"\b(curl|wget)\b[^|#]*\|\s*(sudo\s+)?(ba|z|k|da)?sh\b", "CWE-494", "error",
       "a downloaded script is executed without checking it"),
    _r("sh-eval", "shell", r"(^|[;&|]\s*|\s)eval\s+[\"']?\$", "CWE-95", "error", "eval of a variable runs its content"),
    _r("sh-tls-off", "shell", r"\bcurl\b.*\s(-k|--insecure)\b|\bwget\b.*--no-check-certificate", "CWE-295", "error",
       "TLS certificate verification is turned off"),
    _r("sh-chmod-777", "shell", r"\bchmod\s+(-\w+\s+)*0?777\b|\bchmod\s+(-\w+\s+)*a\+w\b", "CWE-732", "warning",
       "world-writable permissions"),
    _r("sh-rm-var", "shell", r"\brm\s+-\w*r\w*\s+[\"']?\$\{?\w+\}?/?[\"']?(\s|$|/\*)", "CWE-73", "warning",
       "rm -r on a variable path deletes the wrong tree when the variable is empty; use ${VAR:?} and check it"),
    _r("sh-password-arg", "shell", r"\bsshpass\s+-p\s*\S|\bmysql\b.*\s-p\S+|--password[= ]\S+", "CWE-214", "warning",
       "a password on the command line is visible to every user in the process list"),
    _r("sh-tmp-file", "shell", r">\s*/tmp/[\w.-]+(\s|$)", "CWE-377", "warning",
       "a fixed name in /tmp can be pre-created by another user; use mktemp"),
)


def rules_for(language: str) -> list[Rule]:
    """The rules that apply to `language` (one of LANGUAGES)."""
    return [r for r in RULES if language in r.languages]


_PREFILTERS: dict[str, re.Pattern] = {}


def prefilter(language: str) -> re.Pattern:
    """One alternation of every rule of `language`: a line it does not match needs no rule run (most lines)."""
    p = _PREFILTERS.get(language)
    if p is None:
        p = _PREFILTERS[language] = re.compile("|".join(f"(?:{r.pattern.pattern})" for r in rules_for(language)))
    return p

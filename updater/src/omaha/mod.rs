//! Omaha v3 as CoreOS/Flatcar update_engine and Nebraska speak it: request and response XML.
//!
//! Owns: building and parsing `<request>` (client → server) and `<response>` (server → client), the
//! event type/result/error-code numbers, and the input bounds (1 MiB, depth 16, 4096 elements).
//! Does not: decide whether to grant an update (see `server`) or act on one (see `engine`).

use quick_xml::events::Event as XmlEvent;
use quick_xml::Reader;

/// Largest Omaha document accepted, request or response.
pub const MAX_XML_LEN: usize = 1 << 20;
const MAX_DEPTH: usize = 16;
const MAX_ELEMENTS: usize = 4096;

/// Keel's Omaha application id (one for the OS, like CoreOS's e96281a6-…).
pub const KEEL_APPID: &str = "{9b1c7a52-4e1f-4d7e-9a4d-6b0b8a1d5e11}";

/// Event types and results (update_engine's numbers).
pub mod event {
    pub const TYPE_UPDATE_COMPLETE: u32 = 3;
    pub const TYPE_DOWNLOAD_STARTED: u32 = 13;
    pub const TYPE_DOWNLOAD_FINISHED: u32 = 14;
    pub const RESULT_ERROR: u32 = 0;
    pub const RESULT_SUCCESS: u32 = 1;
    pub const RESULT_SUCCESS_REBOOT: u32 = 2;
    /// 3/0 error codes.
    pub const ERR_DOWNLOAD_TRANSFER: u32 = 9;
    pub const ERR_PAYLOAD_HASH: u32 = 10;
    pub const ERR_INSTALL: u32 = 11;
    pub const ERR_SIGNATURE: u32 = 12;
    pub const ERR_DOWNGRADE: u32 = 20;
    pub const ERR_OMAHA_RESPONSE: u32 = 34;
    pub const ERR_ROLLBACK: u32 = 44;
    pub const ERR_HTTP_BASE: u32 = 2000;
}

/// Errors parsing Omaha XML.
#[derive(Debug, thiserror::Error)]
pub enum OmahaError {
    #[error(
        "Omaha document is {0} bytes, over the {MAX_XML_LEN}-byte limit; the server is misbehaving"
    )]
    TooLarge(usize),
    #[error("Omaha XML malformed: {0}")]
    Xml(String),
    #[error("Omaha XML too deeply nested or too many elements; refusing it")]
    TooComplex,
    #[error("Omaha document invalid: {0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, OmahaError>;

/// A parsed element (tiny bounded DOM).
#[derive(Debug, Clone, Default)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
}

impl Element {
    pub fn attr(&self, k: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
}

/// Parses an XML document into its root element, within the size and complexity bounds.
pub fn parse_document(xml: &[u8]) -> Result<Element> {
    if xml.len() > MAX_XML_LEN {
        return Err(OmahaError::TooLarge(xml.len()));
    }
    let text = std::str::from_utf8(xml).map_err(|e| OmahaError::Xml(format!("not UTF-8: {e}")))?;
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Element> = Vec::new();
    let mut count = 0usize;
    let mut root: Option<Element> = None;
    let mk = |e: &quick_xml::events::BytesStart<'_>| -> Result<Element> {
        let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
        let mut attrs = Vec::new();
        for a in e.attributes() {
            let a = a.map_err(|e| OmahaError::Xml(e.to_string()))?;
            let v = a
                .unescape_value()
                .map_err(|e| OmahaError::Xml(e.to_string()))?;
            attrs.push((
                String::from_utf8_lossy(a.key.as_ref()).into_owned(),
                v.into_owned(),
            ));
        }
        Ok(Element {
            name,
            attrs,
            children: Vec::new(),
        })
    };
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| OmahaError::Xml(e.to_string()))?;
        match ev {
            XmlEvent::Start(e) => {
                count += 1;
                if stack.len() >= MAX_DEPTH || count > MAX_ELEMENTS {
                    return Err(OmahaError::TooComplex);
                }
                stack.push(mk(&e)?);
            }
            XmlEvent::Empty(e) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(OmahaError::TooComplex);
                }
                let el = mk(&e)?;
                match stack.last_mut() {
                    Some(p) => p.children.push(el),
                    None if root.is_none() => root = Some(el),
                    None => return Err(OmahaError::Xml("more than one root element".into())),
                }
            }
            XmlEvent::End(e) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| OmahaError::Xml("unbalanced end tag".into()))?;
                if e.name().as_ref() != el.name.as_bytes() {
                    return Err(OmahaError::Xml(format!(
                        "end tag does not match <{}>",
                        el.name
                    )));
                }
                match stack.last_mut() {
                    Some(p) => p.children.push(el),
                    None if root.is_none() => root = Some(el),
                    None => return Err(OmahaError::Xml("more than one root element".into())),
                }
            }
            XmlEvent::Eof => break,
            XmlEvent::DocType(_) => return Err(OmahaError::Xml("DOCTYPE not allowed".into())),
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(OmahaError::Xml(format!(
            "document ends inside <{}>",
            stack[stack.len() - 1].name
        )));
    }
    root.ok_or_else(|| OmahaError::Xml("empty document".into()))
}

fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// One `<event>` in a request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub event_type: u32,
    pub event_result: u32,
    pub error_code: Option<u32>,
    pub previous_version: Option<String>,
}

impl Event {
    pub fn download_started() -> Event {
        Event {
            event_type: 13,
            event_result: 1,
            error_code: None,
            previous_version: None,
        }
    }
    pub fn download_finished() -> Event {
        Event {
            event_type: 14,
            event_result: 1,
            error_code: None,
            previous_version: None,
        }
    }
    pub fn installed() -> Event {
        Event {
            event_type: 3,
            event_result: 1,
            error_code: None,
            previous_version: None,
        }
    }
    pub fn complete_after_reboot(previous: &str) -> Event {
        Event {
            event_type: 3,
            event_result: 2,
            error_code: None,
            previous_version: Some(previous.into()),
        }
    }
    pub fn error(code: u32) -> Event {
        Event {
            event_type: 3,
            event_result: 0,
            error_code: Some(code),
            previous_version: None,
        }
    }
}

/// A client request (one app: the OS).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    pub installsource: String,
    pub os_version: String,
    pub platform: String,
    pub arch: String,
    pub appid: String,
    pub version: String,
    pub track: String,
    pub bootid: String,
    pub machineid: String,
    pub oem: String,
    pub board: String,
    pub ping: bool,
    pub updatecheck: bool,
    pub events: Vec<Event>,
}

impl Request {
    pub fn to_xml(&self) -> String {
        let mut s = String::with_capacity(1024);
        s.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        s.push_str(&format!(
            "<request protocol=\"3.0\" version=\"keel-update-engine-{}\" updaterversion=\"keel-update-engine-{}\" installsource=\"{}\" ismachine=\"1\">\n",
            env!("CARGO_PKG_VERSION"),
            env!("CARGO_PKG_VERSION"),
            esc(&self.installsource)
        ));
        s.push_str(&format!(
            " <os version=\"{}\" platform=\"{}\" sp=\"{}_{}\"></os>\n",
            esc(&self.os_version),
            esc(&self.platform),
            esc(&self.version),
            esc(&self.arch)
        ));
        s.push_str(&format!(
            " <app appid=\"{}\" version=\"{}\" track=\"{}\" bootid=\"{}\" machineid=\"{}\" oem=\"{}\" board=\"{}\" delta_okay=\"false\">\n",
            esc(&self.appid),
            esc(&self.version),
            esc(&self.track),
            esc(&self.bootid),
            esc(&self.machineid),
            esc(&self.oem),
            esc(&self.board)
        ));
        if self.ping {
            s.push_str("  <ping active=\"1\"></ping>\n");
        }
        if self.updatecheck {
            s.push_str("  <updatecheck></updatecheck>\n");
        }
        for e in &self.events {
            s.push_str(&format!(
                "  <event eventtype=\"{}\" eventresult=\"{}\"",
                e.event_type, e.event_result
            ));
            if let Some(c) = e.error_code {
                s.push_str(&format!(" errorcode=\"{c}\""));
            }
            if let Some(p) = &e.previous_version {
                s.push_str(&format!(" previousversion=\"{}\"", esc(p)));
            }
            s.push_str("></event>\n");
        }
        s.push_str(" </app>\n</request>\n");
        s
    }

    pub fn parse(xml: &[u8]) -> Result<Request> {
        let root = parse_document(xml)?;
        if root.name != "request" {
            return Err(OmahaError::Invalid(format!(
                "root is <{}>, expected <request>",
                root.name
            )));
        }
        if root.attr("protocol") != Some("3.0") {
            return Err(OmahaError::Invalid("protocol must be 3.0".into()));
        }
        let app = root
            .child("app")
            .ok_or_else(|| OmahaError::Invalid("request has no <app>".into()))?;
        let os = root.child("os");
        let a = |k: &str| app.attr(k).unwrap_or("").to_string();
        let num = |e: &Element, k: &str| -> Result<Option<u32>> {
            e.attr(k)
                .map(|v| {
                    v.parse::<u32>().map_err(|_| {
                        OmahaError::Invalid(format!("event {k}={v:?} is not a number"))
                    })
                })
                .transpose()
        };
        let mut events = Vec::new();
        for e in app.all("event") {
            events.push(Event {
                event_type: num(e, "eventtype")?
                    .ok_or_else(|| OmahaError::Invalid("event without eventtype".into()))?,
                event_result: num(e, "eventresult")?.unwrap_or(1),
                error_code: num(e, "errorcode")?,
                previous_version: e.attr("previousversion").map(str::to_string),
            });
        }
        let sp = os.and_then(|o| o.attr("sp")).unwrap_or("");
        Ok(Request {
            installsource: root.attr("installsource").unwrap_or("").into(),
            os_version: os.and_then(|o| o.attr("version")).unwrap_or("").into(),
            platform: os.and_then(|o| o.attr("platform")).unwrap_or("").into(),
            arch: sp.rsplit_once('_').map(|(_, a)| a).unwrap_or("").into(),
            appid: a("appid"),
            version: a("version"),
            track: a("track"),
            bootid: a("bootid"),
            machineid: a("machineid"),
            oem: a("oem"),
            board: a("board"),
            ping: app.child("ping").is_some(),
            updatecheck: app.child("updatecheck").is_some(),
            events,
        })
    }
}

/// An offered update.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Update {
    /// Base URLs; the package name is appended.
    pub urls: Vec<String>,
    pub version: String,
    pub package_name: String,
    pub size: u64,
    /// Hex sha256 of the whole payload file.
    pub hash_sha256: String,
}

impl Update {
    /// Full URL of the payload from the first codebase.
    pub fn payload_url(&self) -> Option<String> {
        self.urls
            .first()
            .map(|u| format!("{}{}", u, self.package_name))
    }
}

/// The server's answer for our app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub app_status: String,
    /// `ok`, `noupdate`, or an error status; with `ok`, `update` is set.
    pub updatecheck_status: Option<String>,
    pub update: Option<Update>,
    pub daystart_elapsed_seconds: Option<u64>,
}

impl Response {
    pub fn noupdate(appid: &str) -> String {
        Response::xml(appid, "ok", Some("noupdate"), None, true, 0)
    }

    /// Builds a response document.
    pub fn xml(
        appid: &str,
        app_status: &str,
        check: Option<&str>,
        update: Option<&Update>,
        ping: bool,
        events: usize,
    ) -> String {
        let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response protocol=\"3.0\" server=\"keel-updateserver\">\n");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        s.push_str(&format!(
            " <daystart elapsed_seconds=\"{}\"></daystart>\n",
            now % 86400
        ));
        s.push_str(&format!(
            " <app appid=\"{}\" status=\"{}\">\n",
            esc(appid),
            esc(app_status)
        ));
        if let Some(st) = check {
            match update {
                Some(u) if st == "ok" => {
                    s.push_str("  <updatecheck status=\"ok\">\n   <urls>\n");
                    for url in &u.urls {
                        s.push_str(&format!("    <url codebase=\"{}\"></url>\n", esc(url)));
                    }
                    s.push_str("   </urls>\n");
                    s.push_str(&format!(
                        "   <manifest version=\"{}\">\n    <packages>\n",
                        esc(&u.version)
                    ));
                    s.push_str(&format!(
                        "     <package name=\"{}\" size=\"{}\" hash_sha256=\"{}\" required=\"true\"></package>\n",
                        esc(&u.package_name),
                        u.size,
                        esc(&u.hash_sha256)
                    ));
                    s.push_str("    </packages>\n    <actions>\n");
                    s.push_str(&format!(
                        "     <action event=\"postinstall\" sha256=\"{}\"></action>\n",
                        hex::decode(&u.hash_sha256)
                            .map(|b| base64::Engine::encode(
                                &base64::engine::general_purpose::STANDARD,
                                b
                            ))
                            .unwrap_or_default()
                    ));
                    s.push_str("    </actions>\n   </manifest>\n  </updatecheck>\n");
                }
                _ => s.push_str(&format!(
                    "  <updatecheck status=\"{}\"></updatecheck>\n",
                    esc(st)
                )),
            }
        }
        if ping {
            s.push_str("  <ping status=\"ok\"></ping>\n");
        }
        for _ in 0..events {
            s.push_str("  <event status=\"ok\"></event>\n");
        }
        s.push_str(" </app>\n</response>\n");
        s
    }

    /// Parses a server response and extracts the app `appid`'s answer.
    pub fn parse(xml: &[u8], appid: &str) -> Result<Response> {
        let root = parse_document(xml)?;
        if root.name != "response" {
            return Err(OmahaError::Invalid(format!(
                "root is <{}>, expected <response>",
                root.name
            )));
        }
        if root.attr("protocol") != Some("3.0") {
            return Err(OmahaError::Invalid("protocol must be 3.0".into()));
        }
        let app = root
            .all("app")
            .find(|a| {
                a.attr("appid")
                    .is_some_and(|id| id.eq_ignore_ascii_case(appid))
            })
            .ok_or_else(|| {
                OmahaError::Invalid(format!("response has no <app appid=\"{appid}\">"))
            })?;
        let app_status = app.attr("status").unwrap_or("ok").to_string();
        let uc = app.child("updatecheck");
        let updatecheck_status = uc.and_then(|u| u.attr("status")).map(str::to_string);
        let mut update = None;
        if let (Some(uc), Some("ok")) = (uc, updatecheck_status.as_deref()) {
            let urls: Vec<String> = uc
                .child("urls")
                .map(|u| {
                    u.all("url")
                        .filter_map(|x| x.attr("codebase"))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            if urls.is_empty() {
                return Err(OmahaError::Invalid(
                    "updatecheck ok without any <url codebase>".into(),
                ));
            }
            let m = uc
                .child("manifest")
                .ok_or_else(|| OmahaError::Invalid("updatecheck ok without <manifest>".into()))?;
            let version = m
                .attr("version")
                .ok_or_else(|| OmahaError::Invalid("manifest without version".into()))?;
            let pkg = m
                .child("packages")
                .and_then(|p| p.child("package"))
                .ok_or_else(|| OmahaError::Invalid("manifest without <package>".into()))?;
            let size = pkg
                .attr("size")
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    OmahaError::Invalid("package size missing or not a number".into())
                })?;
            let name = pkg.attr("name").unwrap_or("");
            if name.is_empty() || name.contains("..") {
                return Err(OmahaError::Invalid(format!(
                    "package name {name:?} is empty or has '..'"
                )));
            }
            let hash = pkg.attr("hash_sha256").unwrap_or("").to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(OmahaError::Invalid(
                    "package hash_sha256 is not 64 hex digits".into(),
                ));
            }
            update = Some(Update {
                urls,
                version: version.into(),
                package_name: name.into(),
                size,
                hash_sha256: hash,
            });
        }
        let daystart_elapsed_seconds = root
            .child("daystart")
            .and_then(|d| d.attr("elapsed_seconds"))
            .and_then(|s| s.parse().ok());
        Ok(Response {
            app_status,
            updatecheck_status,
            update,
            daystart_elapsed_seconds,
        })
    }
}

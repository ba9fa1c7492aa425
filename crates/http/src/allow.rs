//! The allow-list for request steps that name their HTTP service by a URL (`http_allow`):
//! the coordinator accepts such a step only when its URL falls under an entry, and the
//! bridge checks the URL of every command again before it sends anything, so neither is an
//! open relay to arbitrary hosts.
//!
//! A URL falls under an entry when both parse as absolute `http`/`https` URLs with the same
//! scheme, host and port (the scheme's default when absent), and the URL's path is the
//! entry's path or lies below it at a segment boundary: `https://api.example.com/ship`
//! allows `https://api.example.com/ship` and `https://api.example.com/ship/eu`, never
//! `https://api.example.com/shipping`, `https://api.example.com.evil.test/ship` or
//! `http://api.example.com/ship`. Paths are compared after the WHATWG URL parser has
//! resolved `.` and `..` segments (also percent-encoded ones), so `/ship/../admin` is
//! `/admin`. URLs with credentials, a query or a fragment are refused, entries and steps
//! alike.

use reqwest::Url;

/// A parsed `http_allow` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UrlAllowList {
    entries: Vec<Url>,
}

/// Why a URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not an absolute http(s) base URL.
    #[error("{url:?} is not a usable base URL: {message}")]
    Malformed {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// Well formed, but under no entry of the list.
    #[error("{url:?} is not under any entry of http_allow")]
    NotAllowed {
        /// The URL as given.
        url: String,
    },
}

/// Parses `raw` as an absolute http(s) base URL without credentials, query or fragment.
fn base_url(raw: &str) -> Result<Url, UrlError> {
    let bad = |message: &str| UrlError::Malformed {
        url: raw.to_string(),
        message: message.to_string(),
    };
    let url = Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it names no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("it carries credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("a base URL has no query or fragment"));
    }
    Ok(url)
}

/// The path without its trailing slashes (`/` for the root).
fn trimmed_path(url: &Url) -> &str {
    let p = url.path().trim_end_matches('/');
    if p.is_empty() { "/" } else { p }
}

impl UrlAllowList {
    /// Parses the entries; the error names the first bad one by its index.
    pub fn new(entries: &[String]) -> Result<UrlAllowList, (usize, UrlError)> {
        let entries = entries
            .iter()
            .enumerate()
            .map(|(i, raw)| base_url(raw).map_err(|e| (i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(UrlAllowList { entries })
    }

    /// Whether the list is empty (then every URL step is refused).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The URL in its normal form (what the bridge calls) if it falls under an entry.
    pub fn check(&self, raw: &str) -> Result<String, UrlError> {
        let url = base_url(raw)?;
        let path = trimmed_path(&url);
        let allowed = self.entries.iter().any(|entry| {
            let root = trimmed_path(entry);
            entry.scheme() == url.scheme()
                && entry.host_str() == url.host_str()
                && entry.port_or_known_default() == url.port_or_known_default()
                && (root == "/"
                    || path == root
                    || path
                        .strip_prefix(root)
                        .is_some_and(|rest| rest.starts_with('/')))
        });
        if !allowed {
            return Err(UrlError::NotAllowed {
                url: raw.to_string(),
            });
        }
        let mut normal = url.to_string();
        while normal.ends_with('/') {
            normal.pop();
        }
        Ok(normal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> UrlAllowList {
        UrlAllowList::new(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("entries parse")
    }

    #[test]
    fn a_url_at_or_below_an_entry_is_allowed_in_its_normal_form() {
        let allow = list(&["https://api.example.com/ship", "http://127.0.0.1:9000/"]);
        assert_eq!(
            allow.check("https://api.example.com/ship").unwrap(),
            "https://api.example.com/ship"
        );
        assert_eq!(
            allow.check("https://API.example.com:443/ship/eu/").unwrap(),
            "https://api.example.com/ship/eu"
        );
        assert_eq!(
            allow.check("http://127.0.0.1:9000/any/path").unwrap(),
            "http://127.0.0.1:9000/any/path"
        );
        assert_eq!(
            allow.check("http://127.0.0.1:9000").unwrap(),
            "http://127.0.0.1:9000"
        );
    }

    #[test]
    fn lookalikes_are_refused() {
        let allow = list(&["https://api.example.com/ship"]);
        for url in [
            "https://api.example.com/shipping",
            "https://api.example.com/",
            "https://api.example.com.evil.test/ship",
            "https://evil.test/api.example.com/ship",
            "http://api.example.com/ship",
            "https://api.example.com:8443/ship",
            "https://api.example.com/ship/../admin",
            "https://api.example.com/ship/%2e%2e/admin",
        ] {
            assert_eq!(
                allow.check(url),
                Err(UrlError::NotAllowed { url: url.into() }),
                "{url}"
            );
        }
    }

    #[test]
    fn malformed_urls_say_what_is_wrong() {
        let allow = list(&["https://api.example.com/"]);
        for (url, says) in [
            ("ftp://api.example.com/x", "scheme"),
            ("https://user:pw@api.example.com/x", "credentials"),
            ("https://api.example.com/x?y=1", "query"),
            ("https://api.example.com/x#y", "fragment"),
            ("not a url", "relative URL"),
        ] {
            let e = allow.check(url).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn an_empty_list_allows_nothing_and_a_bad_entry_is_named() {
        assert!(list(&[]).check("https://api.example.com/").is_err());
        let (i, e) =
            UrlAllowList::new(&["https://ok.test".into(), "https://a@b.test".into()]).unwrap_err();
        assert_eq!(i, 1);
        assert!(e.to_string().contains("credentials"), "{e}");
    }
}

//! A credential that cannot leak by accident: its Debug and Display print `***`, so a
//! config, provider or error that holds one can be logged as a whole.

use std::fmt;
use std::sync::Arc;

/// An API key or other credential. Read it only with [`Secret::expose`], at the point
/// where it goes into a request header.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(s: impl AsRef<str>) -> Self {
        Secret(Arc::from(s.as_ref()))
    }

    /// The credential itself. Never format the result into a message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(Arc::from(s))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_itself() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s} {s:?} {:?}", Some(s.clone())), "*** *** Some(***)");
        assert_eq!(s.expose(), "sk-live-123");
    }
}

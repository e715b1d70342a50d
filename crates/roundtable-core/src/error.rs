//! Errors as values with kinds: each subsystem has an `Error<Kind>` whose small `Copy`
//! kind callers match on (a CAS retry loop matches `err.kind()`, not a string).

use std::fmt;

/// An error of some subsystem, with a kind to match on and a human message.
pub struct Error<K> {
    kind: K,
    message: String,
}

impl<K: Copy> Error<K> {
    pub fn new(kind: K, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }
    pub fn kind(&self) -> K {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<K: fmt::Debug> fmt::Debug for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl<K: fmt::Display> fmt::Display for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl<K: fmt::Debug + fmt::Display> std::error::Error for Error<K> {}

impl<K: Clone> Clone for Error<K> {
    fn clone(&self) -> Self {
        Error { kind: self.kind.clone(), message: self.message.clone() }
    }
}

/// Declares a `Copy` kind enum with a Display that names the kind in words.
#[macro_export]
macro_rules! error_kind {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $var:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name { $($(#[$vm])* $var),+ }
        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(match self { $($name::$var => $text),+ })
            }
        }
    };
}

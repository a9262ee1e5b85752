use std::fmt;

/// A configuration error, reported when a layer is built, never at request time.
///
/// The message names the setting and the problem (for list settings, the position
/// of the bad entry) but never repeats secret material such as a key or a password.
///
/// ```
/// let err = portcullis::IpSet::parse("10.0.0.0/8, not-a-cidr").unwrap_err();
/// assert!(err.to_string().contains("entry 2"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Debug for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConfigError").field(&self.message).finish()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The health of a check, and so of the service instance it guards. Ordered from best to
/// worst so the aggregate of several checks is simply the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A health state name that is not `passing`, `warning` or `critical`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid health status {0:?}: expected passing, warning or critical")]
pub struct InvalidHealth(pub String);

impl FromStr for Health {
    type Err = InvalidHealth;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "passing" => Ok(Health::Passing),
            "warning" => Ok(Health::Warning),
            "critical" => Ok(Health::Critical),
            other => Err(InvalidHealth(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_wins() {
        let all = [Health::Passing, Health::Critical, Health::Warning];
        assert_eq!(all.iter().max(), Some(&Health::Critical));
        assert!("maintenance".parse::<Health>().is_err());
        assert_eq!(
            serde_json::to_string(&Health::Warning).unwrap(),
            "\"warning\""
        );
    }
}

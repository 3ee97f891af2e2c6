//! Durations written the way Consul (and Go's `time.ParseDuration`) writes them: `"10s"`,
//! `"1m30s"`, `"250ms"`, `"1.5h"`. Consul clients send these strings in check definitions
//! and blocking-query `wait` parameters, and read them back in the same shape, so both
//! parsing and formatting follow Go's grammar exactly.

use std::fmt;
use std::time::Duration;

/// A duration string that could not be parsed; the message names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}")]
pub struct InvalidDuration {
    pub input: String,
    pub reason: &'static str,
}

fn invalid(input: &str, reason: &'static str) -> InvalidDuration {
    InvalidDuration {
        input: input.to_owned(),
        reason,
    }
}

/// Parses a Go-style duration. A bare `"0"` is zero; every other number needs a unit
/// (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`). Negative durations are rejected: no Tessera
/// setting has a meaning for them.
pub fn parse_duration(input: &str) -> Result<Duration, InvalidDuration> {
    let s = input.trim();
    if s.is_empty() {
        return Err(invalid(input, "empty string"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.starts_with('-') {
        return Err(invalid(input, "negative durations are not allowed"));
    }
    let mut rest = s;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..num_end];
        if number.is_empty() || number == "." {
            return Err(invalid(input, "expected a number"));
        }
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "" => return Err(invalid(input, "missing unit (use ns, us, ms, s, m or h)")),
            _ => return Err(invalid(input, "unknown unit (use ns, us, ms, s, m or h)")),
        };
        let (whole, frac) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number, ""),
        };
        if frac.contains('.') {
            return Err(invalid(input, "more than one decimal point"));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole
                .parse()
                .map_err(|_| invalid(input, "number too large"))?
        };
        let mut nanos = whole
            .checked_mul(scale)
            .ok_or_else(|| invalid(input, "duration too large"))?;
        // Fractions: keep at most as many digits as the unit has nanoseconds to hold.
        let mut frac_scale = scale;
        for d in frac.bytes() {
            frac_scale /= 10;
            if frac_scale == 0 {
                break;
            }
            nanos += u128::from(d - b'0') * frac_scale;
        }
        total_nanos = total_nanos
            .checked_add(nanos)
            .ok_or_else(|| invalid(input, "duration too large"))?;
    }
    // Go's durations are i64 nanoseconds (~292 years); anything above is a typo.
    if total_nanos > i64::MAX as u128 {
        return Err(invalid(input, "duration too large"));
    }
    let secs = (total_nanos / 1_000_000_000) as u64;
    let sub = (total_nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, sub))
}

/// Formats like Go's `Duration.String()`: `"1m0s"`, `"1.5s"`, `"250ms"`, `"0s"`.
pub fn format_duration(d: Duration) -> String {
    GoDuration(d).to_string()
}

/// Display adapter with Go's formatting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        if nanos < 1_000_000_000 {
            // Sub-second: pick the largest unit that keeps an integer part.
            let (unit, scale) = if nanos < 1_000 {
                ("ns", 1u128)
            } else if nanos < 1_000_000 {
                ("µs", 1_000)
            } else {
                ("ms", 1_000_000)
            };
            write_fraction(f, nanos, scale)?;
            return f.write_str(unit);
        }
        let hours = nanos / 3_600_000_000_000;
        let rem = nanos % 3_600_000_000_000;
        let minutes = rem / 60_000_000_000;
        let sec_nanos = rem % 60_000_000_000;
        if hours > 0 {
            write!(f, "{hours}h{minutes}m")?;
        } else if minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        write_fraction(f, sec_nanos, 1_000_000_000)?;
        f.write_str("s")
    }
}

fn write_fraction(f: &mut fmt::Formatter<'_>, value: u128, scale: u128) -> fmt::Result {
    let whole = value / scale;
    let frac = value % scale;
    write!(f, "{whole}")?;
    if frac > 0 {
        let width = scale.ilog10() as usize;
        let digits = format!("{frac:0width$}");
        write!(f, ".{}", digits.trim_end_matches('0'))?;
    }
    Ok(())
}

/// Serde helpers for optional Go-style duration fields. Accepts a string (`"10s"`) or an
/// integer number of nanoseconds, as Consul does.
pub mod serde_opt {
    use super::*;
    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::Serializer;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Option<Duration>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"10s\" or a number of nanoseconds")
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
                d.deserialize_any(V)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v.is_empty() {
                    return Ok(None);
                }
                parse_duration(v).map(Some).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Some(Duration::from_nanos(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(|v| Some(Duration::from_nanos(v)))
                    .map_err(|_| E::custom("negative durations are not allowed"))
            }
            fn visit_f64<E: de::Error>(self, _v: f64) -> Result<Self::Value, E> {
                Err(E::custom(
                    "a duration must be a string such as \"10s\" or whole nanoseconds",
                ))
            }
        }
        d.deserialize_option(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let cases = [
            ("0", Duration::ZERO),
            ("10s", Duration::from_secs(10)),
            ("1m30s", Duration::from_secs(90)),
            ("250ms", Duration::from_millis(250)),
            ("1.5h", Duration::from_secs(5400)),
            ("1h2m3s4ms", Duration::new(3723, 4_000_000)),
            ("100us", Duration::from_micros(100)),
            ("100µs", Duration::from_micros(100)),
            ("7ns", Duration::from_nanos(7)),
            (".5s", Duration::from_millis(500)),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration(s).unwrap(), want, "{s}");
        }
    }

    #[test]
    fn rejects_bad_durations() {
        for s in [
            "",
            "10",
            "10 parsecs",
            "10parsecs",
            "-1s",
            "s",
            "1..2s",
            "9999999999h",
        ] {
            let err = parse_duration(s).unwrap_err();
            assert_eq!(err.input, s);
        }
    }

    #[test]
    fn formats_like_go() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(10), "10s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_micros(3), "3µs"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want);
            assert_eq!(parse_duration(want).unwrap(), d, "round trip {want}");
        }
    }
}

//! Which traces are recorded, set the OpenTelemetry way: `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG`, so one setting covers Tessera and the SDKs beside it.

use crate::context::{SpanContext, TraceId};

/// A root decision, and whether a parent's decision is followed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    /// The share of new traces recorded (ids below the bound), 0.0-1.0.
    pub ratio: f64,
    /// Follow the caller's `sampled` flag when there is a caller (the default).
    pub parent_based: bool,
}

impl Default for Sampler {
    /// `parentbased_always_on`, OpenTelemetry's default.
    fn default() -> Sampler {
        Sampler {
            ratio: 1.0,
            parent_based: true,
        }
    }
}

impl Sampler {
    /// Reads the two variables' values (names as the specification lists them).
    pub fn parse(name: Option<&str>, arg: Option<&str>) -> Result<Sampler, String> {
        let ratio = || match arg.map(str::trim) {
            None | Some("") => Ok(1.0),
            Some(a) => match a.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(format!(
                    "OTEL_TRACES_SAMPLER_ARG={a:?} is not a ratio from 0 to 1"
                )),
            },
        };
        let (ratio, parent_based) = match name.map(str::trim).unwrap_or("parentbased_always_on") {
            "always_on" => (1.0, false),
            "always_off" => (0.0, false),
            "traceidratio" => (ratio()?, false),
            "" | "parentbased_always_on" => (1.0, true),
            "parentbased_always_off" => (0.0, true),
            "parentbased_traceidratio" => (ratio()?, true),
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not one of always_on, always_off, \
                     traceidratio, parentbased_always_on, parentbased_always_off, \
                     parentbased_traceidratio"
                ));
            }
        };
        Ok(Sampler {
            ratio,
            parent_based,
        })
    }

    /// From the environment; a value it cannot read is reported and the default used.
    pub fn from_env() -> Sampler {
        let get = |k| std::env::var(k).ok();
        let (name, arg) = (get("OTEL_TRACES_SAMPLER"), get("OTEL_TRACES_SAMPLER_ARG"));
        Sampler::parse(name.as_deref(), arg.as_deref()).unwrap_or_else(|e| {
            tracing::warn!("{e}; sampling as parentbased_always_on");
            Sampler::default()
        })
    }

    /// Whether a span of `trace` is recorded, given the caller's context if any.
    pub fn sampled(&self, parent: Option<&SpanContext>, trace: TraceId) -> bool {
        if self.parent_based
            && let Some(p) = parent
        {
            return p.sampled;
        }
        // The ratio decision looks at the id's last 8 bytes, as OpenTelemetry's SDKs do,
        // so every process deciding on the same trace decides alike.
        if self.ratio >= 1.0 {
            return true;
        }
        let low = u64::from_be_bytes(trace.0[8..16].try_into().unwrap_or_default()) >> 1;
        low < (self.ratio * (1u64 << 63) as f64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::SpanId;

    fn parent(sampled: bool) -> SpanContext {
        SpanContext {
            trace_id: TraceId([7; 16]),
            span_id: SpanId([1; 8]),
            sampled,
        }
    }

    #[test]
    fn the_specified_names_and_their_meaning() {
        let p = |n: &str, a: Option<&str>| Sampler::parse(Some(n), a).unwrap();
        assert_eq!(Sampler::parse(None, None).unwrap(), Sampler::default());
        let on = p("always_on", None);
        assert!(on.sampled(Some(&parent(false)), TraceId::random()));
        let off = p("always_off", None);
        assert!(!off.sampled(Some(&parent(true)), TraceId::random()));
        let follow = p("parentbased_always_off", None);
        assert!(follow.sampled(Some(&parent(true)), TraceId::random()));
        assert!(!follow.sampled(None, TraceId::random()));
        assert!(p("parentbased_always_on", None).sampled(None, TraceId::random()));
        assert_eq!(p("parentbased_traceidratio", Some("0.25")).ratio, 0.25);
    }

    #[test]
    fn a_ratio_samples_about_its_share_and_decides_alike_for_one_trace() {
        let s = Sampler::parse(Some("traceidratio"), Some("0.1")).unwrap();
        let n = (0..20_000)
            .filter(|_| s.sampled(None, TraceId::random()))
            .count();
        assert!((1_400..2_600).contains(&n), "{n} of 20,000 at 0.1");
        let t = TraceId::random();
        let first = s.sampled(None, t);
        assert!((0..100).all(|_| s.sampled(None, t) == first));
        let none = Sampler::parse(Some("traceidratio"), Some("0")).unwrap();
        assert!(!none.sampled(None, TraceId([0xff; 16])));
        let all = Sampler::parse(Some("traceidratio"), Some("1")).unwrap();
        assert!(all.sampled(None, TraceId([0xff; 16])));
    }

    #[test]
    fn bad_values_name_themselves() {
        let e = Sampler::parse(Some("jaeger_remote"), None).unwrap_err();
        assert!(e.contains("jaeger_remote"), "{e}");
        let e = Sampler::parse(Some("traceidratio"), Some("1.5")).unwrap_err();
        assert!(e.contains("1.5"), "{e}");
        let e = Sampler::parse(Some("traceidratio"), Some("half")).unwrap_err();
        assert!(e.contains("half"), "{e}");
    }
}

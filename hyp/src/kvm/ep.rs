//! What the `ep` guest ([`super::Program::Ep`], the NPB EP kernel) reports on its
//! console, and the host's own check of it against the NPB specification's
//! verification values for class S.
//!
//! The guest prints one line when it is done:
//!
//! ```text
//! ep: q=6140517,5865300,... pairs=13176389 sx=<16 hex digits> sy=<16 hex digits> verified
//! ```
//!
//! `sx` and `sy` are the bit patterns of the two doubles, so the host sees exactly
//! what the guest computed.

/// Class S: 2^24 Gaussian pairs in 256 batches (M = 24).
pub const CLASS_S_BATCHES: u64 = 256;
/// The specification's sum of the X deviates for class S.
pub const CLASS_S_SX: f64 = -3.247_834_652_034_74e+3;
/// The specification's sum of the Y deviates for class S.
pub const CLASS_S_SY: f64 = -6.958407078382297e+3;
/// The specification's tolerance: relative error of each sum.
pub const EPSILON: f64 = 1.0e-8;

/// The `ep` guest's result line.
#[derive(Clone, Debug, PartialEq)]
pub struct EpResult {
    /// Pairs whose larger absolute deviate falls in [l, l + 1), l = 0..9.
    pub q: [u64; 10],
    /// Gaussian pairs in all (the sum of `q`, as the guest counted it).
    pub pairs: u64,
    /// The sum of the X deviates.
    pub sx: f64,
    /// The sum of the Y deviates.
    pub sy: f64,
    /// Whether the guest found both sums within [`EPSILON`] of the reference.
    pub guest_verified: bool,
}

impl EpResult {
    /// The result line in `console`, or `None` if the guest has not printed it (or
    /// printed something malformed).
    pub fn parse(console: &str) -> Option<Self> {
        let line = console.lines().find(|l| l.starts_with("ep: q="))?;
        let mut q = None;
        let (mut pairs, mut sx, mut sy, mut verdict) = (None, None, None, None);
        for word in line["ep: ".len()..].split(' ') {
            match word.split_once('=') {
                Some(("q", list)) => {
                    let counts: Vec<u64> = list
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .ok()?;
                    q = Some(<[u64; 10]>::try_from(counts).ok()?);
                }
                Some(("pairs", n)) => pairs = Some(n.parse().ok()?),
                Some(("sx", bits)) => sx = Some(hex_f64(bits)?),
                Some(("sy", bits)) => sy = Some(hex_f64(bits)?),
                // "NOT verified" is final; "verified" alone means verified.
                None if word == "NOT" => verdict = Some(false),
                None if word == "verified" => verdict = verdict.or(Some(true)),
                _ => {}
            }
        }
        Some(Self {
            q: q?,
            pairs: pairs?,
            sx: sx?,
            sy: sy?,
            guest_verified: verdict?,
        })
    }

    /// The host's own verification: both sums within [`EPSILON`] of class S's
    /// reference values and the counts adding up to the pairs.
    pub fn verifies_class_s(&self) -> bool {
        let close = |value: f64, reference: f64| ((value - reference) / reference).abs() <= EPSILON;
        close(self.sx, CLASS_S_SX)
            && close(self.sy, CLASS_S_SY)
            && self.q.iter().sum::<u64>() == self.pairs
    }
}

fn hex_f64(digits: &str) -> Option<f64> {
    (digits.len() == 16)
        .then(|| u64::from_str_radix(digits, 16).ok())
        .flatten()
        .map(f64::from_bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(sx: f64, sy: f64, verdict: &str) -> String {
        format!(
            "ep: class S\nep: q=6,5,1,0,0,0,0,0,0,0 pairs=12 sx={:016x} sy={:016x} {verdict}\n",
            sx.to_bits(),
            sy.to_bits()
        )
    }

    #[test]
    fn the_result_line_is_parsed_and_checked_against_the_specification() {
        let ok =
            EpResult::parse(&line(CLASS_S_SX, CLASS_S_SY * (1.0 + 1e-12), "verified")).unwrap();
        assert_eq!(ok.q[0], 6);
        assert_eq!(ok.pairs, 12);
        assert!(ok.guest_verified && ok.verifies_class_s());
        let off =
            EpResult::parse(&line(CLASS_S_SX * (1.0 + 1e-7), CLASS_S_SY, "NOT verified")).unwrap();
        assert!(!off.guest_verified && !off.verifies_class_s());
        assert_eq!(EpResult::parse("ep: class S\n"), None);
        assert_eq!(
            EpResult::parse("ep: q=1,2 pairs=3 sx=0 sy=0 verified\n"),
            None
        );
    }
}

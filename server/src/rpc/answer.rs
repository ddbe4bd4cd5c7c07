//! Writing a call's outcome into its result union, and auditing admin calls.
//!
//! Every method's result is a union of `ok` and `failure`, but the generated
//! builders share no trait: [`answer!`] writes either side in one line.

/// Writes `outcome` into the result union `result`: `fill(value, result.init_ok())`
/// on success, or the error's wire code and message on failure. Without `fill`,
/// the `ok` side is void (`set_ok(())`).
macro_rules! answer {
    ($result:expr, $outcome:expr) => {{
        let mut result = $result;
        match $outcome {
            Ok(()) => result.set_ok(()),
            Err(err) => err.fill(result.init_failure()),
        }
    }};
    ($result:expr, $outcome:expr, $fill:expr) => {{
        let result = $result;
        match $outcome {
            Ok(value) => $fill(value, result.init_ok()),
            Err(err) => err.fill(result.init_failure()),
        }
    }};
}

pub(super) use answer;

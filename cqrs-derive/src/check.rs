//! Rules that span several attributes, checked once every attribute is read.

use crate::ast::Input;
use crate::ctxt::Ctxt;

/// Two events of one type stored under the same (name, version) could not be told apart
/// when read back: the second one is refused, at its name, naming the first.
pub fn check(cx: &mut Ctxt, input: &Input) {
    let events = input.events();
    for (index, (variant, event)) in events.iter().enumerate() {
        let first = events[..index]
            .iter()
            .find(|(_, earlier)| earlier.name == event.name && earlier.version == event.version);
        if let Some((first_variant, _)) = first {
            let first =
                first_variant.map_or_else(String::new, |ident| format!("variant `{ident}`"));
            let this = variant.map_or_else(String::new, |ident| format!(" for `{ident}`"));
            cx.syn_error(syn::Error::new(
                event.name_span,
                format!(
                    "duplicate event name and version{this}: {first} is already stored as \
                     `{}` version \"{}\"; give this one another `name`, or another `version` \
                     if it is an older shape of the same event",
                    event.name, event.version
                ),
            ));
        }
    }
}

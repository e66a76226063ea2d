//! Reading and writing FlatBuffers headers, the same way for every opcode: headers from the
//! network are verified with [`HEADER_VERIFIER`]'s limits and a header that fails is a
//! [`WireError::BadHeader`] naming the frame, never a panic.

use bytes::Bytes;
use flatbuffers::{FlatBufferBuilder, Follow, Verifiable, WIPOffset};

use super::error::WireError;
use super::frame::Frame;
use super::limits::HEADER_VERIFIER;

/// The finished header bytes of `root`.
pub(crate) fn finish<T>(mut fbb: FlatBufferBuilder<'_>, root: WIPOffset<T>) -> Bytes {
    fbb.finish_minimal(root);
    Bytes::copy_from_slice(fbb.finished_data())
}

/// A field-less table `T`. Every field-less table encodes to the same bytes, so one builder
/// serves them all; the type parameter only says which table the caller means.
pub(crate) fn empty<'b, T>(fbb: &mut FlatBufferBuilder<'b>) -> WIPOffset<T> {
    let start = fbb.start_table();
    WIPOffset::new(fbb.end_table(start).value())
}

/// A [`WireError::BadHeader`] for `frame` saying `reason`.
pub(crate) fn bad_header(frame: &Frame, reason: String) -> WireError {
    WireError::BadHeader {
        request_id: frame.request_id,
        opcode: frame.opcode,
        reason,
    }
}

/// Verifies `frame.header` as a `T` with the network limits.
pub(crate) fn verify<'a, T>(frame: &'a Frame) -> Result<T::Inner, WireError>
where
    T: Follow<'a> + Verifiable + 'a,
{
    flatbuffers::root_with_opts::<T>(&HEADER_VERIFIER, &frame.header)
        .map_err(|e| bad_header(frame, e.to_string()))
}

/// For field-less tables: an empty header is accepted, anything else must verify.
pub(crate) fn verify_empty<'a, T>(frame: &'a Frame) -> Result<(), WireError>
where
    T: Follow<'a> + Verifiable + 'a,
{
    if !frame.header.is_empty() {
        verify::<T>(frame)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::generated as fb;

    #[test]
    fn the_shared_empty_table_is_byte_for_byte_what_flatc_writes() {
        let mut fbb = FlatBufferBuilder::new();
        let root = fb::PingRequest::create(&mut fbb, &fb::PingRequestArgs {});
        let from_flatc = finish(fbb, root);
        let mut fbb = FlatBufferBuilder::new();
        let root: WIPOffset<fb::PingRequest<'_>> = empty(&mut fbb);
        assert_eq!(finish(fbb, root), from_flatc);
    }
}

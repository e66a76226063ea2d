//! The machinery behind the opcode table in [`super`]: `opcodes!` turns one row per opcode
//! into [`Opcode`](super::Opcode), [`Request`](super::Request), [`Response`](super::Response)
//! and every `match` over them, so that nothing about an opcode is written twice.
//!
//! A row is
//!
//! ```text
//! /// doc of the opcode
//! NUMBER => Opcode "NAME" {
//!     request: Variant = RequestTable,
//!     response: Variant = ResponseTable,
//! },
//! ```
//!
//! where a variant is written as it is declared: `Ping`, `GetRoute { topic: String }` or
//! `Produce(ProduceRequest)`, and a table is a FlatBuffers table of `schema/ringmq.fbs`. A row
//! without the braces is a replication-stream frame (no request, no response: read only on a
//! replication connection). A unit variant's table must be field-less; for any other variant the
//! family file implements, on the generated table type,
//!
//! ```text
//! fn encode(fbb, field, ...) -> WIPOffset<Self>   // the variant's fields, by reference
//! fn decode(self) -> Result<Fields, String>       // a tuple, or the type of a lone field;
//!                                                 // Err(reason) becomes WireError::BadHeader
//! ```
//!
//! Rows are in numeric order, checked at compile time; a repeated number does not build either
//! (the discriminants of `Opcode` are explicit).

/// See the module doc.
macro_rules! opcodes {
    (
        $(#[$opcode_doc:meta])* pub enum Opcode;
        $(#[$request_doc:meta])* pub enum Request;
        $(#[$response_doc:meta])* pub enum Response;
        $(
            $(#[$doc:meta])*
            $num:literal => $op:ident $name:literal $({
                request: $req:ident
                    $({ $($req_field:ident : $req_ty:ty),* })? $(( $req_inner:ty ))?
                    = $req_table:ident,
                response: $resp:ident
                    $({ $($resp_field:ident : $resp_ty:ty),* })? $(( $resp_inner:ty ))?
                    = $resp_table:ident $(,)?
            })?,
        )*
    ) => {
        $(#[$opcode_doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum Opcode {
            $( $(#[$doc])* $op = $num, )*
        }

        impl Opcode {
            /// Every opcode, in numeric order.
            pub const ALL: [Opcode; [$($num),*].len()] = [$(Opcode::$op),*];

            /// The number sent on the wire.
            pub const fn as_u16(self) -> u16 {
                self as u16
            }

            /// `None` for a number this build does not know.
            pub const fn from_u16(n: u16) -> Option<Opcode> {
                match n {
                    $( $num => Some(Opcode::$op), )*
                    _ => None,
                }
            }

            /// SCREAMING_SNAKE name for logs.
            pub const fn name(self) -> &'static str {
                match self {
                    $( Opcode::$op => $name, )*
                }
            }

            /// Whether frames with this opcode only travel on a replication connection after
            /// the ReplFollow handshake, never as ordinary requests or responses.
            pub const fn is_replication_stream(self) -> bool {
                match self {
                    $( Opcode::$op => $crate::protocol::messages::table::opcodes!(@stream_only $($req)?), )*
                }
            }
        }

        const _: () = {
            let all = Opcode::ALL;
            let mut i = 1;
            while i < all.len() {
                assert!(all[i - 1].as_u16() < all[i].as_u16(), "opcode rows out of order");
                i += 1;
            }
        };

        impl ::std::fmt::Display for Opcode {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }

        $crate::protocol::messages::table::opcodes!(@direction
            $(#[$request_doc])* Request "request" "The opcode this request is sent with."
            $( $op [$( $req $({ $($req_field: $req_ty),* })? $(( $req_inner ))? = $req_table )?] )*
        );
        $crate::protocol::messages::table::opcodes!(@direction
            $(#[$response_doc])* Response "response"
            "The opcode of the request this response answers."
            $( $op [$( $resp $({ $($resp_field: $resp_ty),* })? $(( $resp_inner ))? = $resp_table )?] )*
        );
    };

    // One direction's enum (`Request` or `Response`) from its side of every row; a row with
    // nothing in brackets has no message in this direction (a replication-stream frame).
    (@direction
        $(#[$doc:meta])* $enum:ident $what:literal $opcode_doc:literal
        $( $op:ident [$(
            $var:ident $({ $($field:ident : $ty:ty),* })? $(( $inner:ty ))? = $table:ident
        )?] )*
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $enum {
            $($( $var $({ $($field: $ty),* })? $(( $inner ))?, )?)*
        }

        impl $enum {
            #[doc = $opcode_doc]
            pub fn opcode(&self) -> Opcode {
                match self {
                    $($( $enum::$var { .. } => Opcode::$op, )?)*
                }
            }

            #[doc = concat!("Encodes the FlatBuffers header of this ", $what, ".")]
            pub fn encode_header(&self) -> ::bytes::Bytes {
                match self {
                    $($(
                        $crate::protocol::messages::table::opcodes!(@pattern $enum $var fields
                            $({ $($field: $ty),* })? $(( $inner ))?)
                        => $crate::protocol::messages::table::opcodes!(@encode $table fields
                            $({ $($field: $ty),* })? $(( $inner ))?),
                    )?)*
                }
            }

            #[doc = concat!("The ", $what, " of opcode `opcode` in `frame`'s header.")]
            fn decode(
                opcode: Opcode,
                frame: &$crate::protocol::Frame,
            ) -> Result<$enum, $crate::protocol::WireError> {
                Ok(match opcode {
                    $(
                        Opcode::$op => $crate::protocol::messages::table::opcodes!(@decode frame
                            $($enum $var $table $({ $($field: $ty),* })? $(( $inner ))?)?),
                    )*
                })
            }
        }
    };

    // A row without request and response is a replication-stream frame.
    (@stream_only $req:ident) => { false };
    (@stream_only) => { true };

    // The pattern that binds a variant's fields (a lone tuple field as `$bind`).
    (@pattern $enum:ident $var:ident $bind:ident) => { $enum::$var };
    (@pattern $enum:ident $var:ident $bind:ident { $($field:ident: $ty:ty),* }) => {
        $enum::$var { $($field),* }
    };
    (@pattern $enum:ident $var:ident $bind:ident ( $inner:ty )) => { $enum::$var($bind) };

    // The header of the fields bound by `@pattern`.
    (@encode $table:ident $bind:ident) => {{
        let mut fbb = ::flatbuffers::FlatBufferBuilder::with_capacity(128);
        let root: ::flatbuffers::WIPOffset<$crate::protocol::generated::$table<'_>> =
            $crate::protocol::header::empty(&mut fbb);
        $crate::protocol::header::finish(fbb, root)
    }};
    (@encode $table:ident $bind:ident { $($field:ident: $ty:ty),* }) => {{
        let mut fbb = ::flatbuffers::FlatBufferBuilder::with_capacity(128);
        let root = $crate::protocol::generated::$table::encode(&mut fbb, $($field),*);
        $crate::protocol::header::finish(fbb, root)
    }};
    (@encode $table:ident $bind:ident ( $inner:ty )) => {{
        let mut fbb = ::flatbuffers::FlatBufferBuilder::with_capacity(128);
        let root = $crate::protocol::generated::$table::encode(&mut fbb, $bind);
        $crate::protocol::header::finish(fbb, root)
    }};

    // The variant read from `$frame`'s header.
    (@decode $frame:ident) => {
        return Err($crate::protocol::WireError::ReplicationStreamOnly {
            request_id: $frame.request_id,
            opcode: $frame.opcode,
        })
    };
    (@decode $frame:ident $enum:ident $var:ident $table:ident) => {{
        $crate::protocol::header::verify_empty::<$crate::protocol::generated::$table>($frame)?;
        $enum::$var
    }};
    (@decode $frame:ident $enum:ident $var:ident $table:ident { $field:ident: $ty:ty }) => {
        $enum::$var { $field: $crate::protocol::messages::table::opcodes!(@fields $frame $table) }
    };
    (@decode $frame:ident $enum:ident $var:ident $table:ident { $($field:ident: $ty:ty),* }) => {{
        let ($($field,)*) = $crate::protocol::messages::table::opcodes!(@fields $frame $table);
        $enum::$var { $($field),* }
    }};
    (@decode $frame:ident $enum:ident $var:ident $table:ident ( $inner:ty )) => {
        $enum::$var($crate::protocol::messages::table::opcodes!(@fields $frame $table))
    };
    (@fields $frame:ident $table:ident) => {
        $crate::protocol::header::verify::<$crate::protocol::generated::$table>($frame)?
            .decode()
            .map_err(|reason| $crate::protocol::header::bad_header($frame, reason))?
    };
}

pub(super) use opcodes;

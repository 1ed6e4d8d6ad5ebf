//! Pure parsing of OpenTherm Gateway (OTGW) serial output: lines, frames, values, canonical fields.
//!
//! Owns the line classifier ([`parse_line`]), the 32-bit frame layout, the OpenTherm value
//! encodings, the data-id → [`Reported`] mapping and the byte-to-line splitter ([`LineBuffer`]).
//! Must not do I/O, log or read a clock; the only state kept between lines is the splitter's
//! buffer and the [`Decoder`]'s override state (the serial task in `otgw_source.rs` does the rest).
//! Invariants: no input makes it panic; a line is a frame only if it is a source letter plus exactly
//! 8 upper-case hex digits; facts and line shapes follow shared/design/protocols.md Part A.

use crate::model::{Fixed, Function, LoadState, Mode, Reported, TempUnit, Temperature};

/// Longest accepted line in bytes, terminator excluded. The longest legitimate output is the
/// PS=1 summary line, at most about 280 characters (protocols.md §6.3); everything else is short.
pub const MAX_LINE_BYTES: usize = 512;

/// Why a line is not something the gateway prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// Nothing but whitespace.
    #[error("empty line")]
    Empty,
    /// More than [`MAX_LINE_BYTES`] bytes without a line terminator.
    #[error("line longer than {MAX_LINE_BYTES} bytes")]
    TooLong,
    /// A control character or a byte outside printable ASCII.
    #[error("line has non-printable or non-ascii characters")]
    NotPrintable,
    /// Hex digits without a source letter (a partial frame, e.g. right after opening the port).
    #[error("frame without a source letter")]
    MissingSource,
    /// Eight hex digits after a character that is not `T`, `B`, `R`, `A` or `E`.
    #[error("unknown source letter {0:?}")]
    BadSource(char),
    /// A source letter followed by the wrong number of hex digits.
    #[error("frame has {digits} hex digits, expected 8")]
    WrongLength {
        /// How many hex digits followed the letter.
        digits: usize,
    },
    /// A source letter followed by 8 characters that are not all upper-case hex digits.
    #[error("frame has a character that is not an upper-case hex digit")]
    BadHex,
    /// A `T` or `B` frame whose 32 bits hold an odd number of ones.
    #[error("frame has odd parity")]
    Parity,
    /// Printable text that matches no known gateway output.
    #[error("unrecognized line")]
    Unrecognized,
}

/// Who sent a reported frame (protocols.md §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// `T`: received from the thermostat (OpenTherm master).
    Thermostat,
    /// `B`: received from the boiler (OpenTherm slave).
    Boiler,
    /// `R`: the request the gateway sent to the boiler instead of the thermostat's.
    Request,
    /// `A`: the answer the gateway sent to the thermostat instead of the boiler's.
    Answer,
}

impl Source {
    /// The letter the gateway prints.
    pub fn letter(self) -> char {
        match self {
            Source::Thermostat => 'T',
            Source::Boiler => 'B',
            Source::Request => 'R',
            Source::Answer => 'A',
        }
    }
}

/// The 3-bit OpenTherm message type (protocols.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// 0, master → slave.
    ReadData,
    /// 1, master → slave.
    WriteData,
    /// 2, master → slave.
    InvalidData,
    /// 3, reserved.
    Reserved,
    /// 4, slave → master.
    ReadAck,
    /// 5, slave → master.
    WriteAck,
    /// 6, slave → master.
    DataInvalid,
    /// 7, slave → master.
    UnknownDataId,
}

impl MsgType {
    /// The type from its 3-bit code; higher bits are ignored.
    pub fn from_bits(bits: u8) -> MsgType {
        match bits & 0b111 {
            0 => MsgType::ReadData,
            1 => MsgType::WriteData,
            2 => MsgType::InvalidData,
            3 => MsgType::Reserved,
            4 => MsgType::ReadAck,
            5 => MsgType::WriteAck,
            6 => MsgType::DataInvalid,
            _ => MsgType::UnknownDataId,
        }
    }

    /// The 3-bit code.
    pub fn bits(self) -> u8 {
        self as u8
    }

    /// True for the slave-to-master types (bit 2 of the code, bit 30 of the frame).
    pub fn is_from_slave(self) -> bool {
        self.bits() & 0b100 != 0
    }
}

/// One OpenTherm frame as the gateway reported it (protocols.md §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Which side of the gateway it was seen on.
    pub source: Source,
    /// The 32 bits, MSB first as printed: parity, type, spare, data id, value.
    pub raw: u32,
}

impl Frame {
    /// Bits 30-28.
    pub fn msg_type(&self) -> MsgType {
        MsgType::from_bits((self.raw >> 28) as u8)
    }

    /// Bits 27-24, which should be 0.
    pub fn spare(&self) -> u8 {
        ((self.raw >> 24) & 0x0F) as u8
    }

    /// Bits 23-16.
    pub fn data_id(&self) -> u8 {
        (self.raw >> 16) as u8
    }

    /// Bits 15-0.
    pub fn value(&self) -> u16 {
        self.raw as u16
    }

    /// High byte of the value (hex digits 5-6).
    pub fn hb(&self) -> u8 {
        hb(self.value())
    }

    /// Low byte of the value (hex digits 7-8).
    pub fn lb(&self) -> u8 {
        lb(self.value())
    }

    /// True when the 32 bits hold an even number of ones, as the spec requires.
    pub fn parity_is_even(&self) -> bool {
        self.raw.count_ones().is_multiple_of(2)
    }
}

/// An OpenTherm bus receive error, `Error 0x` (protocols.md §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BusError {
    /// `Error 01`: more than one mid-bit transition.
    MidBitTransitions,
    /// `Error 02`: wrong stop bit; an `E` line follows.
    StopBit,
    /// `Error 03`: a bit was not received in time.
    BitTimeout,
    /// `Error 04`: parity error; an `E` line follows.
    Parity,
    /// Any other two-hex-digit number, which firmware 6.6 does not print.
    Other(u8),
}

/// An error token in a command response (protocols.md §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorToken {
    /// `NG`: unknown command code.
    NoGood,
    /// `SE`: syntax error.
    SyntaxError,
    /// `BV`: bad value.
    BadValue,
    /// `OR`: out of range.
    OutOfRange,
    /// `NS`: alternative-id table full.
    NoSpace,
    /// `NF`: alternative id not found.
    NotFound,
    /// `OE`: serial receive overrun.
    Overrun,
}

impl ErrorToken {
    /// The token for its two letters, if it is one.
    pub fn parse(s: &str) -> Option<ErrorToken> {
        Some(match s {
            "NG" => ErrorToken::NoGood,
            "SE" => ErrorToken::SyntaxError,
            "BV" => ErrorToken::BadValue,
            "OR" => ErrorToken::OutOfRange,
            "NS" => ErrorToken::NoSpace,
            "NF" => ErrorToken::NotFound,
            "OE" => ErrorToken::Overrun,
            _ => return None,
        })
    }
}

/// The result part of a `XX: result` command response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The accepted value as echoed, e.g. `21.50`, `M=G`, `-`.
    Value(String),
    /// An error token in place of the value.
    Error(ErrorToken),
}

/// Smart-power level announcements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerLevel {
    /// `Low power`.
    Low,
    /// `Medium power`.
    Medium,
    /// `High power`.
    High,
}

/// One classified line of gateway output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A reported OpenTherm message (`T`, `B`, `R` or `A` plus 8 hex digits).
    Frame(Frame),
    /// An `E` line: the raw bits of a frame the gateway rejected (after `Error 02`/`Error 04`).
    Rejected {
        /// The 32 bits as printed.
        raw: u32,
    },
    /// `Error 0x`: an OpenTherm bus receive error.
    BusError(BusError),
    /// `XX: result`: the response to a command.
    Response {
        /// The two command letters, e.g. `TT`.
        command: String,
        /// The value or error token.
        reply: Reply,
    },
    /// A bare error token on its own line (`SE` for a malformed command).
    BareError(ErrorToken),
    /// The PS=1 summary line (34 or 25 comma-separated fields), kept verbatim.
    Summary(String),
    /// `OpenTherm Gateway <version>` after a reset.
    Greeting {
        /// The firmware version, e.g. `6.6`.
        version: String,
    },
    /// `WDT reset!`.
    WatchdogReset,
    /// `Thermostat connected`.
    ThermostatConnected,
    /// `Thermostat disconnected`.
    ThermostatDisconnected,
    /// `Low power` / `Medium power` / `High power`.
    Power(PowerLevel),
}

/// Classifies one line of gateway output (terminator optional).
///
/// Anything up to and including the last EOT (0x04) is discarded first, and surrounding
/// whitespace is ignored (protocols.md §1, §9).
///
/// # Errors
/// A [`LineError`] naming why the line is noise; the caller counts it and carries on.
pub fn parse_line(line: &str) -> Result<Line, LineError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(LineError::TooLong);
    }
    let line = match line.rfind('\u{4}') {
        Some(i) => &line[i + 1..],
        None => line,
    };
    let line = line.trim_matches(|c: char| c.is_ascii_whitespace());
    if line.is_empty() {
        return Err(LineError::Empty);
    }
    if !line.bytes().all(|b| (0x20..=0x7E).contains(&b)) {
        return Err(LineError::NotPrintable);
    }
    let b = line.as_bytes();
    if b.len() == 9
        && let Some(raw) = hex_u32(&b[1..])
    {
        let source = match b[0] {
            b'T' => Source::Thermostat,
            b'B' => Source::Boiler,
            b'R' => Source::Request,
            b'A' => Source::Answer,
            b'E' => return Ok(Line::Rejected { raw }),
            other => return Err(LineError::BadSource(char::from(other))),
        };
        let frame = Frame { source, raw };
        // The PIC drops T/B frames with bad parity itself (Error 04), so an odd one was corrupted
        // on the serial line; R/A parity is recomputed by the gateway and not checked (§2.3).
        if matches!(source, Source::Thermostat | Source::Boiler) && !frame.parity_is_even() {
            return Err(LineError::Parity);
        }
        return Ok(Line::Frame(frame));
    }
    if let Some(code) = line.strip_prefix("Error ") {
        if let [hi, lo] = code.as_bytes()
            && let (Some(hi), Some(lo)) = (hex_nibble(*hi), hex_nibble(*lo))
        {
            return Ok(Line::BusError(match (hi << 4) | lo {
                1 => BusError::MidBitTransitions,
                2 => BusError::StopBit,
                3 => BusError::BitTimeout,
                4 => BusError::Parity,
                n => BusError::Other(n),
            }));
        }
        return Err(LineError::Unrecognized);
    }
    if b.len() >= 3 && b[0].is_ascii_uppercase() && b[1].is_ascii_uppercase() && b[2] == b':' {
        let result = line[3..].trim_start_matches(' ');
        let reply = match ErrorToken::parse(result) {
            Some(token) => Reply::Error(token),
            None => Reply::Value(result.to_owned()),
        };
        return Ok(Line::Response {
            command: line[..2].to_owned(),
            reply,
        });
    }
    if let Some(token) = ErrorToken::parse(line) {
        return Ok(Line::BareError(token));
    }
    if let Some(version) = line.strip_prefix("OpenTherm Gateway ") {
        return Ok(Line::Greeting {
            version: version.trim().to_owned(),
        });
    }
    match line {
        "WDT reset!" => return Ok(Line::WatchdogReset),
        "Thermostat connected" => return Ok(Line::ThermostatConnected),
        "Thermostat disconnected" => return Ok(Line::ThermostatDisconnected),
        "Low power" => return Ok(Line::Power(PowerLevel::Low)),
        "Medium power" => return Ok(Line::Power(PowerLevel::Medium)),
        "High power" => return Ok(Line::Power(PowerLevel::High)),
        _ => {}
    }
    let fields = line.split(',').count();
    if fields == 34 || fields == 25 {
        return Ok(Line::Summary(line.to_owned()));
    }
    Err(frame_shape_error(b))
}

/// Why a line that matched nothing else is not a frame, as precisely as its shape allows.
fn frame_shape_error(b: &[u8]) -> LineError {
    let is_letter = matches!(b[0], b'T' | b'B' | b'R' | b'A' | b'E');
    let rest = &b[1..];
    if is_letter && !rest.is_empty() && rest.iter().all(u8::is_ascii_hexdigit) && rest.len() != 8 {
        return LineError::WrongLength { digits: rest.len() };
    }
    if is_letter && b.len() == 9 {
        return LineError::BadHex;
    }
    if b.len() <= 8 && b.iter().all(u8::is_ascii_hexdigit) && !is_letter {
        return LineError::MissingSource;
    }
    LineError::Unrecognized
}

/// The value of one upper-case hex digit (the firmware prints `0-9A-F` only).
fn hex_nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Exactly 8 upper-case hex digits as a u32.
fn hex_u32(digits: &[u8]) -> Option<u32> {
    if digits.len() != 8 {
        return None;
    }
    digits
        .iter()
        .try_fold(0u32, |acc, &c| Some((acc << 4) | u32::from(hex_nibble(c)?)))
}

// ------------------------------------------------------------------ value encodings (§4.1)

/// `f8.8` (two's complement, value / 256) in hundredths, rounded half away from zero.
pub fn f8_8(raw: u16) -> Fixed {
    let n = i64::from(s16(raw)) * 100;
    let half = if n < 0 { -128 } else { 128 };
    Fixed((n + half) / 256)
}

/// High byte of a 16-bit value (data byte 3).
pub fn hb(raw: u16) -> u8 {
    (raw >> 8) as u8
}

/// Low byte of a 16-bit value (data byte 4).
pub fn lb(raw: u16) -> u8 {
    raw as u8
}

/// `s8`: a byte as two's complement.
pub fn s8(raw: u8) -> i8 {
    raw as i8
}

/// `s16`: a 16-bit value as two's complement.
pub fn s16(raw: u16) -> i16 {
    raw as i16
}

/// `flag8`: bit `bit` of `byte`, bit 0 being the least significant; `false` for bits above 7.
pub fn flag(byte: u8, bit: u8) -> bool {
    bit < 8 && (byte >> bit) & 1 == 1
}

/// ID 0 slave status (LB) bit: CH mode, i.e. central heating active.
pub const SLAVE_CH_ACTIVE: u8 = 1;
/// ID 0 slave status (LB) bit: DHW mode.
pub const SLAVE_DHW_ACTIVE: u8 = 2;
/// ID 0 slave status (LB) bit: flame on.
pub const SLAVE_FLAME_ON: u8 = 3;
/// ID 0 slave status (LB) bit: cooling active.
pub const SLAVE_COOLING_ACTIVE: u8 = 4;

/// Data id of the master/slave status flags.
pub const ID_STATUS: u8 = 0;
/// Data id of the room setpoint (f8.8 °C).
pub const ID_ROOM_SETPOINT: u8 = 16;
/// Data id of the room temperature (f8.8 °C).
pub const ID_ROOM_TEMPERATURE: u8 = 24;

// ------------------------------------------------------------------ canonical mapping (§6, §9)

/// The canonical fields one frame carries, or `None` when it carries none.
///
/// - Room setpoint (id 16) and room temperature (id 24): the thermostat's own `T` WRITE-DATA.
/// - Status (id 0): the boiler's `B` READ-ACK low byte. `load_state` is ACTIVE when CH is active
///   with the flame on, or cooling is active (the Home Assistant rule, §6.2); `function` is
///   COOLING / HEATING only while cooling / CH mode is on, and not reported otherwise.
/// - Everything else, including the override ids 9 and 100, gives `None`.
pub fn to_reported(frame: &Frame) -> Option<Reported> {
    let celsius = |raw| Temperature {
        value: f8_8(raw),
        unit: TempUnit::C,
    };
    let mut r = Reported::default();
    match (frame.source, frame.msg_type(), frame.data_id()) {
        (Source::Thermostat, MsgType::WriteData, ID_ROOM_SETPOINT) => {
            r.setpoint = Some(celsius(frame.value()));
        }
        (Source::Thermostat, MsgType::WriteData, ID_ROOM_TEMPERATURE) => {
            r.temperature = Some(celsius(frame.value()));
        }
        (Source::Boiler, MsgType::ReadAck, ID_STATUS) => {
            let slave = frame.lb();
            let ch = flag(slave, SLAVE_CH_ACTIVE);
            let flame = flag(slave, SLAVE_FLAME_ON);
            let cooling = flag(slave, SLAVE_COOLING_ACTIVE);
            r.load_state = Some(if (ch && flame) || cooling {
                LoadState::Active
            } else {
                LoadState::Inactive
            });
            r.function = if cooling {
                Some(Function::Cooling)
            } else if ch {
                Some(Function::Heating)
            } else {
                None
            };
        }
        _ => return None,
    }
    Some(r)
}

// ------------------------------------------------------------------ stateful decoding (§6)

/// Data id of the remote override room setpoint (f8.8, 0 = no override).
pub const ID_REMOTE_OVERRIDE: u8 = 9;
/// Data id of the remote override function flags (LB bit0 manual, bit1 program change priority).
pub const ID_REMOTE_OVERRIDE_FUNCTION: u8 = 100;

/// Whether a data id is defined by the OpenTherm specification (v2.2 plus the ventilation and
/// solar ids of later versions); frames with other ids are counted as unknown.
pub fn is_known_id(id: u8) -> bool {
    matches!(id, 0..=33 | 37..=39 | 48..=58 | 70..=91 | 93..=102 | 113..=127)
}

/// The gateway's remote-override state as the thermostat sees it (protocols.md §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    /// Id 9 answered 0.
    None,
    /// Id 9 non-zero with id 100 bit 1 set (`TT`), or flags not seen yet.
    Temporary,
    /// Id 9 non-zero with only id 100 bit 0 set (`TC`).
    Constant,
}

/// What one frame contributed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decoded {
    /// Canonical fields, in the order the frames were decided (a held frame may come first).
    pub reported: Vec<Reported>,
    /// Boiler-side values with no canonical field, for status output: (name, °C / % / bar).
    pub values: Vec<(&'static str, Fixed)>,
}

/// Stateful decoding of the frame stream into canonical fields: [`to_reported`] plus the
/// remote-override state (ids 9 and 100) → `mode`, and the boiler values shown in status.
///
/// Ids 9 and 100 are answered twice when the gateway overrides: first the boiler's `B` line,
/// then the gateway's own `A` line, which is what the thermostat acts on (§2.2, §6.1). A `B`
/// READ-ACK for those ids is therefore held until the next frame: dropped if that is the `A`
/// for the same id, used otherwise. So an active override never flaps through "no override".
#[derive(Debug, Clone)]
pub struct Decoder {
    held: Option<Frame>,
    override_active: Option<bool>,
    override_flags: Option<u8>,
    modes: [Mode; 3],
}

impl Decoder {
    /// `modes`: the canonical mode for no override, a temporary one and a constant one.
    pub fn new(none: Mode, temporary: Mode, constant: Mode) -> Decoder {
        Decoder {
            held: None,
            override_active: None,
            override_flags: None,
            modes: [none, temporary, constant],
        }
    }

    /// The override state, once id 9 has been answered.
    pub fn override_state(&self) -> Option<Override> {
        let active = self.override_active?;
        Some(if !active {
            Override::None
        } else if self.override_flags.is_some_and(|f| f & 0b11 == 0b01) {
            Override::Constant
        } else {
            Override::Temporary
        })
    }

    /// Feeds one frame.
    pub fn frame(&mut self, f: Frame) -> Decoded {
        let mut out = Decoded::default();
        let is_override_id = matches!(
            f.data_id(),
            ID_REMOTE_OVERRIDE | ID_REMOTE_OVERRIDE_FUNCTION
        );
        if let Some(held) = self.held.take()
            && !(f.source == Source::Answer && f.data_id() == held.data_id())
        {
            self.apply_override(held, &mut out);
        }
        if is_override_id && f.msg_type() == MsgType::ReadAck {
            match f.source {
                Source::Boiler => self.held = Some(f),
                Source::Answer => self.apply_override(f, &mut out),
                _ => {}
            }
        }
        if let Some(r) = to_reported(&f) {
            out.reported.push(r);
        }
        if let Some(v) = boiler_value(&f) {
            out.values.push(v);
        }
        out
    }

    fn apply_override(&mut self, f: Frame, out: &mut Decoded) {
        if f.data_id() == ID_REMOTE_OVERRIDE {
            self.override_active = Some(f.value() != 0);
        } else {
            self.override_flags = Some(f.lb());
        }
        if let Some(state) = self.override_state() {
            let mode = match state {
                Override::None => self.modes[0],
                Override::Temporary => self.modes[1],
                Override::Constant => self.modes[2],
            };
            out.reported.push(Reported {
                mode: Some(mode),
                ..Reported::default()
            });
        }
        if f.data_id() == ID_REMOTE_OVERRIDE && f.value() != 0 {
            out.values.push(("override_setpoint", f8_8(f.value())));
        }
    }
}

/// Boiler values with no canonical field, from the boiler's acknowledgements (`B` lines).
fn boiler_value(f: &Frame) -> Option<(&'static str, Fixed)> {
    if f.source != Source::Boiler || !matches!(f.msg_type(), MsgType::ReadAck | MsgType::WriteAck) {
        return None;
    }
    let name = match f.data_id() {
        1 => "control_setpoint",
        17 => "relative_modulation",
        18 => "ch_water_pressure",
        25 => "boiler_water_temperature",
        26 => "dhw_temperature",
        27 => "outside_temperature",
        28 => "return_water_temperature",
        56 => "dhw_setpoint",
        57 => "max_ch_setpoint",
        _ => return None,
    };
    Some((name, f8_8(f.value())))
}

// ------------------------------------------------------------------ byte stream → lines

/// Splits serial bytes into lines across reads.
///
/// CR and LF both end a line and empty lines are skipped. A line longer than its limit is
/// reported once as [`LineError::TooLong`] and its remaining bytes are dropped up to the next
/// terminator. Bytes that are not UTF-8 are replaced (U+FFFD), so [`parse_line`] rejects the line.
#[derive(Debug, Clone)]
pub struct LineBuffer {
    buf: Vec<u8>,
    max_line_bytes: usize,
    overlong: bool,
}

impl Default for LineBuffer {
    fn default() -> Self {
        LineBuffer::new(MAX_LINE_BYTES)
    }
}

impl LineBuffer {
    /// A buffer that accepts lines of at most `max_line_bytes` bytes.
    pub fn new(max_line_bytes: usize) -> LineBuffer {
        LineBuffer {
            buf: Vec::new(),
            max_line_bytes,
            overlong: false,
        }
    }

    /// Appends one read's bytes and returns every line they complete, in order.
    ///
    /// # Errors
    /// An item is `Err(LineError::TooLong)` once per over-long line.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Result<String, LineError>> {
        let mut out = Vec::new();
        for &byte in bytes {
            if byte == b'\r' || byte == b'\n' {
                if !self.overlong && !self.buf.is_empty() {
                    out.push(Ok(String::from_utf8_lossy(&self.buf).into_owned()));
                }
                self.buf.clear();
                self.overlong = false;
            } else if !self.overlong {
                if self.buf.len() == self.max_line_bytes {
                    out.push(Err(LineError::TooLong));
                    self.buf.clear();
                    self.overlong = true;
                } else {
                    self.buf.push(byte);
                }
            }
        }
        out
    }

    /// Bytes of the unfinished line held so far.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The 20 lines of protocols.md §8, in order.
    const WORKED_EXAMPLE: [&str; 20] = [
        "T00000300",
        "BC000030A",
        "T90012D80",
        "B50012D80",
        "T90101480",
        "B50101480",
        "T901813FB",
        "B501813FB",
        "T00110000",
        "BC0112580",
        "TT: 21.50",
        "T00090000",
        "BF0090000",
        "AC0091580",
        "T80640000",
        "B70640000",
        "A40640303",
        "Error 04",
        "E901813FA",
        "T10101580",
    ];

    const SUMMARY: &str = "00000010/00001100,10.00,00000011/00000011,15.00,5.00,100.00,33/17,20.50,3.50,2.10,2.36,16.50,20.42,43.50,40.20,-3.30,39.50,24.19,-28,60/40,75/20,60.00,50.00,00000011/01000110,25,13,52072,54920,51856,5480,3688,5624,58496,136";

    fn frame(line: &str) -> Frame {
        match parse_line(line) {
            Ok(Line::Frame(f)) => f,
            other => panic!("{line}: expected a frame, got {other:?}"),
        }
    }

    /// (source, type, id, value) of a frame line.
    fn parts(line: &str) -> (Source, MsgType, u8, u16) {
        let f = frame(line);
        (f.source, f.msg_type(), f.data_id(), f.value())
    }

    fn celsius(hundredths: i64) -> Temperature {
        Temperature {
            value: Fixed(hundredths),
            unit: TempUnit::C,
        }
    }

    #[test]
    fn every_line_of_the_worked_example_decodes_as_the_doc_states() {
        use MsgType::*;
        use Source::*;
        let expected = [
            (Thermostat, ReadData, 0, 0x0300),
            (Boiler, ReadAck, 0, 0x030A),
            (Thermostat, WriteData, 1, 0x2D80),
            (Boiler, WriteAck, 1, 0x2D80),
            (Thermostat, WriteData, 16, 0x1480),
            (Boiler, WriteAck, 16, 0x1480),
            (Thermostat, WriteData, 24, 0x13FB),
            (Boiler, WriteAck, 24, 0x13FB),
            (Thermostat, ReadData, 17, 0x0000),
            (Boiler, ReadAck, 17, 0x2580),
        ];
        for (line, want) in WORKED_EXAMPLE[..10].iter().zip(expected) {
            assert_eq!(parts(line), want, "{line}");
        }
        assert_eq!(
            parse_line(WORKED_EXAMPLE[10]),
            Ok(Line::Response {
                command: "TT".into(),
                reply: Reply::Value("21.50".into())
            })
        );
        let expected = [
            (Thermostat, ReadData, 9, 0x0000),
            (Boiler, UnknownDataId, 9, 0x0000),
            (Answer, ReadAck, 9, 0x1580),
            (Thermostat, ReadData, 100, 0x0000),
            (Boiler, UnknownDataId, 100, 0x0000),
            (Answer, ReadAck, 100, 0x0303),
        ];
        for (line, want) in WORKED_EXAMPLE[11..17].iter().zip(expected) {
            assert_eq!(parts(line), want, "{line}");
        }
        assert_eq!(
            parse_line(WORKED_EXAMPLE[17]),
            Ok(Line::BusError(BusError::Parity))
        );
        assert_eq!(
            parse_line(WORKED_EXAMPLE[18]),
            Ok(Line::Rejected { raw: 0x9018_13FA })
        );
        assert_eq!(
            parts(WORKED_EXAMPLE[19]),
            (Thermostat, WriteData, 16, 0x1580)
        );
        for line in WORKED_EXAMPLE {
            if let Ok(Line::Frame(f)) = parse_line(line) {
                assert!(f.parity_is_even(), "{line}");
                assert_eq!(f.spare(), 0, "{line}");
            }
        }
    }

    #[test]
    fn worked_example_values_decode_to_the_stated_numbers() {
        assert_eq!(f8_8(frame("T90012D80").value()), Fixed(4550));
        assert_eq!(f8_8(frame("T90101480").value()), Fixed(2050));
        assert_eq!(f8_8(frame("T901813FB").value()), Fixed(1998));
        assert_eq!(f8_8(frame("BC0112580").value()), Fixed(3750));
        assert_eq!(f8_8(frame("AC0091580").value()), Fixed(2150));
        assert_eq!(f8_8(frame("T10101580").value()), Fixed(2150));
        let ovrd = frame("A40640303");
        assert!(flag(ovrd.lb(), 0) && flag(ovrd.lb(), 1));
        let master = frame("T00000300").hb();
        assert!(flag(master, 0) && flag(master, 1) && !flag(master, 2));
    }

    #[test]
    fn line_2_bit_arithmetic_matches_section_8_1() {
        let f = frame("BC000030A");
        assert_eq!(f.raw, 0xC000_030A);
        assert_eq!(f.raw >> 31, 1, "parity bit set");
        assert_eq!(f.msg_type(), MsgType::ReadAck);
        assert!(f.msg_type().is_from_slave());
        assert_eq!((f.spare(), f.data_id(), f.hb(), f.lb()), (0, 0, 0x03, 0x0A));
        let bits: Vec<bool> = (0..8).map(|i| flag(f.lb(), i)).collect();
        assert_eq!(bits, [false, true, false, true, false, false, false, false]);
        assert_eq!((f.raw & 0x7FFF_FFFF).count_ones(), 5);
        assert_eq!(f.raw.count_ones(), 6);
    }

    #[test]
    fn line_7_bit_arithmetic_matches_section_8_2() {
        let f = frame("T901813FB");
        assert_eq!(f.raw, 0x9018_13FB);
        assert_eq!(f.msg_type(), MsgType::WriteData);
        assert!(!f.msg_type().is_from_slave());
        assert_eq!((f.data_id(), f.value()), (24, 5115));
        assert_eq!((f.hb(), f.lb()), (0x13, 0xFB));
        assert_eq!(f.raw.count_ones(), 14);
        // Line 19 is the same frame with the last bit flipped: odd, so the gateway rejected it.
        assert_eq!(0x9018_13FAu32.count_ones(), 13);
        assert_eq!(parse_line("T901813FA"), Err(LineError::Parity));
    }

    #[test]
    fn golden_lines_of_section_8_3_decode() {
        let f = frame("R100131B9");
        assert_eq!(
            (f.source, f.msg_type(), f.data_id(), f.value()),
            (Source::Request, MsgType::WriteData, 1, 0x31B9)
        );
        assert_eq!(f8_8(f.value()), Fixed(4972));
        assert_eq!(
            parts("R00000300"),
            (Source::Request, MsgType::ReadData, 0, 0x0300)
        );
        assert_eq!(f8_8(frame("AC009101A").value()), Fixed(1610));
        assert_eq!(f8_8(frame("AC0091034").value()), Fixed(1620));
        let constant = frame("A40640101");
        assert!(flag(constant.lb(), 0) && !flag(constant.lb(), 1));
        assert_eq!(
            parts("BC0192B80"),
            (Source::Boiler, MsgType::ReadAck, 25, 0x2B80)
        );
        assert_eq!(f8_8(0x2B80), Fixed(4350));
        assert_eq!(parts("AC0090000"), (Source::Answer, MsgType::ReadAck, 9, 0));
    }

    #[test]
    fn value_encodings_follow_section_4_1() {
        assert_eq!(f8_8(0x1580), Fixed(2150));
        assert_eq!(f8_8(0xFAC0), Fixed(-525));
        assert_eq!(f8_8(0xFF80), Fixed(-50));
        assert_eq!(f8_8(0x1480), Fixed(2050));
        assert_eq!(f8_8(0x0020), Fixed(13), "0.125 rounds half away from zero");
        assert_eq!(f8_8(0xFFE0), Fixed(-13));
        assert_eq!(f8_8(0x7FFF), Fixed(12800));
        assert_eq!(f8_8(0x8000), Fixed(-12800));
        assert_eq!(s8(0xFF), -1);
        assert_eq!(s16(0xFFFF), -1);
        assert_eq!(s16(0xFF83), -125);
        assert_eq!((hb(0x1234), lb(0x1234)), (0x12, 0x34));
        assert!(flag(0b0000_0001, 0) && !flag(0b0000_0001, 1));
        assert!(!flag(0xFF, 8));
    }

    #[test]
    fn non_message_lines_of_section_5_are_classified() {
        let resp = |c: &str, r: Reply| {
            Ok(Line::Response {
                command: c.into(),
                reply: r,
            })
        };
        assert_eq!(
            parse_line("CH: BV"),
            resp("CH", Reply::Error(ErrorToken::BadValue))
        );
        assert_eq!(
            parse_line("ZZ: NG"),
            resp("ZZ", Reply::Error(ErrorToken::NoGood))
        );
        assert_eq!(
            parse_line("MI: OR"),
            resp("MI", Reply::Error(ErrorToken::OutOfRange))
        );
        assert_eq!(
            parse_line("PR: M=G"),
            resp("PR", Reply::Value("M=G".into()))
        );
        assert_eq!(parse_line("OT: -"), resp("OT", Reply::Value("-".into())));
        assert_eq!(
            parse_line("PR: A=OpenTherm Gateway 6.6"),
            resp("PR", Reply::Value("A=OpenTherm Gateway 6.6".into()))
        );
        assert_eq!(
            parse_line("SE"),
            Ok(Line::BareError(ErrorToken::SyntaxError))
        );
        assert_eq!(parse_line("OE"), Ok(Line::BareError(ErrorToken::Overrun)));
        for (n, e) in [
            ("01", BusError::MidBitTransitions),
            ("02", BusError::StopBit),
            ("03", BusError::BitTimeout),
            ("04", BusError::Parity),
            ("1F", BusError::Other(0x1F)),
        ] {
            assert_eq!(parse_line(&format!("Error {n}")), Ok(Line::BusError(e)));
        }
        assert_eq!(
            parse_line("OpenTherm Gateway 6.6"),
            Ok(Line::Greeting {
                version: "6.6".into()
            })
        );
        assert_eq!(parse_line("WDT reset!"), Ok(Line::WatchdogReset));
        assert_eq!(
            parse_line("Thermostat connected"),
            Ok(Line::ThermostatConnected)
        );
        assert_eq!(
            parse_line("Thermostat disconnected"),
            Ok(Line::ThermostatDisconnected)
        );
        assert_eq!(
            parse_line("Medium power"),
            Ok(Line::Power(PowerLevel::Medium))
        );
        assert_eq!(parse_line(SUMMARY), Ok(Line::Summary(SUMMARY.into())));
    }

    #[test]
    fn noise_lines_give_the_matching_error() {
        assert_eq!(parse_line(""), Err(LineError::Empty));
        assert_eq!(parse_line(" \r\n"), Err(LineError::Empty));
        assert_eq!(parse_line(&"T".repeat(600)), Err(LineError::TooLong));
        assert_eq!(parse_line("T0000\u{1}300"), Err(LineError::NotPrintable));
        assert_eq!(parse_line("T0000é300"), Err(LineError::NotPrintable));
        assert_eq!(parse_line("0000300"), Err(LineError::MissingSource));
        assert_eq!(parse_line("X00000300"), Err(LineError::BadSource('X')));
        assert_eq!(parse_line("t00000300"), Err(LineError::BadSource('t')));
        assert_eq!(
            parse_line("T0000030"),
            Err(LineError::WrongLength { digits: 7 })
        );
        assert_eq!(
            parse_line("B00000300FF"),
            Err(LineError::WrongLength { digits: 10 })
        );
        assert_eq!(parse_line("T0000030G"), Err(LineError::BadHex));
        assert_eq!(parse_line("t0000030a"), Err(LineError::Unrecognized));
        assert_eq!(
            parse_line("T0000030a"),
            Err(LineError::BadHex),
            "lower-case hex"
        );
        assert_eq!(parse_line("B4000030A"), Err(LineError::Parity));
        assert_eq!(parse_line("Error xx"), Err(LineError::Unrecognized));
        assert_eq!(parse_line("hello world"), Err(LineError::Unrecognized));
        assert_eq!(parse_line("1,2,3"), Err(LineError::Unrecognized));
    }

    #[test]
    fn answer_and_request_frames_are_kept_despite_odd_parity() {
        let f = frame("A40640303");
        assert!(f.parity_is_even());
        let odd = frame("A00640303");
        assert!(!odd.parity_is_even());
        assert_eq!(odd.source, Source::Answer);
        assert!(!frame("R00000301").parity_is_even());
    }

    #[test]
    fn a_line_after_an_eot_and_with_a_terminator_still_decodes() {
        assert_eq!(parts("ignorethis\u{4}T00000300\r\n").3, 0x0300);
        assert_eq!(parts("\u{80}\u{4}T00000300").0, Source::Thermostat);
    }

    #[test]
    fn error_messages_are_lowercase() {
        let all = [
            LineError::Empty,
            LineError::TooLong,
            LineError::NotPrintable,
            LineError::MissingSource,
            LineError::BadSource('X'),
            LineError::WrongLength { digits: 7 },
            LineError::BadHex,
            LineError::Parity,
            LineError::Unrecognized,
        ];
        for e in all {
            let s = e.to_string();
            assert!(s.starts_with(|c: char| c.is_ascii_lowercase()), "{s}");
            assert!(!s.ends_with('.'), "{s}");
        }
        assert_eq!(
            LineError::BadSource('X').to_string(),
            "unknown source letter 'X'"
        );
    }

    #[test]
    fn worked_example_maps_to_heating_active_with_setpoint_and_temperature() {
        let mut merged = Reported::default();
        let mut mapped = 0;
        for line in WORKED_EXAMPLE {
            if let Ok(Line::Frame(f)) = parse_line(line)
                && let Some(r) = to_reported(&f)
            {
                mapped += 1;
                assert!(!r.is_empty());
                merged.setpoint = r.setpoint.or(merged.setpoint);
                merged.temperature = r.temperature.or(merged.temperature);
                merged.load_state = r.load_state.or(merged.load_state);
                merged.function = r.function.or(merged.function);
            }
        }
        assert_eq!(mapped, 4, "lines 2, 5, 7 and 20");
        assert_eq!(merged.setpoint, Some(celsius(2150)));
        assert_eq!(merged.temperature, Some(celsius(1998)));
        assert_eq!(merged.load_state, Some(LoadState::Active));
        assert_eq!(merged.function, Some(Function::Heating));
        assert_eq!(merged.mode, None);
    }

    #[test]
    fn to_reported_reads_each_value_only_from_the_frame_that_carries_it() {
        let map = |line: &str| to_reported(&frame(line));
        assert_eq!(
            map("T90101480"),
            Some(Reported {
                setpoint: Some(celsius(2050)),
                ..Default::default()
            })
        );
        assert_eq!(
            map("T901813FB"),
            Some(Reported {
                temperature: Some(celsius(1998)),
                ..Default::default()
            })
        );
        assert_eq!(
            map("BC000030A"),
            Some(Reported {
                load_state: Some(LoadState::Active),
                function: Some(Function::Heating),
                ..Default::default()
            })
        );
        // Acks of ids 16/24, the master's status request, an A answer and ids 9/100: nothing.
        for line in [
            "B50101480",
            "B501813FB",
            "T00000300",
            "AC0091580",
            "A40640303",
            "BC0192B80",
            "B50012D80",
        ] {
            assert_eq!(map(line), None, "{line}");
        }
    }

    #[test]
    fn boiler_status_flags_decide_load_state_and_function() {
        let status = |lb: u8| {
            let raw = 0x4000_0300 | u32::from(lb);
            let raw = if raw.count_ones() % 2 == 1 {
                raw | (1 << 31)
            } else {
                raw
            };
            to_reported(&Frame {
                source: Source::Boiler,
                raw,
            })
            .map(|r| (r.load_state, r.function))
        };
        use Function::*;
        use LoadState::*;
        assert_eq!(status(0b0000_0000), Some((Some(Inactive), None)));
        assert_eq!(
            status(0b0000_0010),
            Some((Some(Inactive), Some(Heating))),
            "CH, no flame"
        );
        assert_eq!(status(0b0000_1010), Some((Some(Active), Some(Heating))));
        assert_eq!(
            status(0b0000_1100),
            Some((Some(Inactive), None)),
            "DHW + flame"
        );
        assert_eq!(status(0b0001_0000), Some((Some(Active), Some(Cooling))));
    }

    fn stream() -> Vec<u8> {
        let mut bytes = Vec::new();
        for line in WORKED_EXAMPLE {
            bytes.extend_from_slice(line.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes
    }

    #[test]
    fn worked_example_stream_in_odd_chunks_yields_the_same_lines() {
        let bytes = stream();
        for chunk in [1, 2, 3, 5, 7, 11, 13, 64, bytes.len()] {
            let mut lb = LineBuffer::default();
            let mut lines = Vec::new();
            for c in bytes.chunks(chunk) {
                lines.extend(lb.push(c));
            }
            let want: Vec<Result<String, LineError>> =
                WORKED_EXAMPLE.iter().map(|l| Ok(l.to_string())).collect();
            assert_eq!(lines, want, "chunk {chunk}");
            assert_eq!(lb.pending_bytes(), 0);
        }
    }

    #[test]
    fn a_partial_line_waits_for_its_terminator() {
        let mut lb = LineBuffer::default();
        assert!(lb.push(b"T0000").is_empty());
        assert_eq!(lb.pending_bytes(), 5);
        assert_eq!(lb.push(b"0300\nB"), vec![Ok("T00000300".to_string())]);
        assert_eq!(lb.push(b"C000030A\r"), vec![Ok("BC000030A".to_string())]);
        assert!(lb.push(b"\n\r\n\n").is_empty(), "empty lines are skipped");
    }

    #[test]
    fn an_over_long_line_is_reported_once_and_the_next_line_decodes() {
        let mut lb = LineBuffer::new(16);
        let mut out = lb.push(&[b'x'; 40]);
        out.extend(lb.push(&[b'y'; 40]));
        out.extend(lb.push(b"\r\nT00000300\r\n"));
        assert_eq!(
            out,
            vec![Err(LineError::TooLong), Ok("T00000300".to_string())]
        );
        let mut lb = LineBuffer::new(9);
        assert_eq!(lb.push(b"T00000300\r\n"), vec![Ok("T00000300".to_string())]);
        assert_eq!(lb.push(b"T000003000\r\n"), vec![Err(LineError::TooLong)]);
        let mut lb = LineBuffer::default();
        assert_eq!(lb.push(SUMMARY.as_bytes()), vec![]);
        assert_eq!(lb.push(b"\r\n"), vec![Ok(SUMMARY.to_string())]);
    }

    #[test]
    fn noise_in_the_stream_gives_errors_and_valid_lines_after_it_still_decode() {
        let mut bytes = b"\x00\xff\xfe garbage\r\n".to_vec();
        bytes.extend_from_slice(b"T0000030G\r\nT0000030\r\nError 01\r\nX00000300\r\n");
        bytes.extend_from_slice(&[b'A'; 700]);
        bytes.extend_from_slice(b"\r\nignorethis\x04T00000300\r\n");
        bytes.extend(stream());
        let mut lb = LineBuffer::default();
        let mut parsed = Vec::new();
        for c in bytes.chunks(7) {
            for item in lb.push(c) {
                parsed.push(item.and_then(|l| parse_line(&l)));
            }
        }
        assert_eq!(parsed[0], Err(LineError::NotPrintable));
        assert_eq!(parsed[1], Err(LineError::BadHex));
        assert_eq!(parsed[2], Err(LineError::WrongLength { digits: 7 }));
        assert_eq!(parsed[3], Ok(Line::BusError(BusError::MidBitTransitions)));
        assert_eq!(parsed[4], Err(LineError::BadSource('X')));
        assert_eq!(parsed[5], Err(LineError::TooLong));
        assert_eq!(parsed[6], parse_line("T00000300"));
        let rest: Vec<_> = parsed[7..].to_vec();
        let want: Vec<_> = WORKED_EXAMPLE.iter().map(|l| parse_line(l)).collect();
        assert_eq!(rest, want);
        assert!(rest.iter().filter(|r| r.is_ok()).count() == 20);
    }

    proptest! {
        #[test]
        fn parse_line_never_panics_on_arbitrary_strings(s in "(?s).{0,600}") {
            let _ = parse_line(&s);
        }

        #[test]
        fn parse_line_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse_line(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn line_buffer_yields_short_nonempty_lines_for_any_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..2000),
            chunk in 1usize..64,
        ) {
            let mut lb = LineBuffer::new(32);
            for c in bytes.chunks(chunk) {
                for line in lb.push(c).into_iter().flatten() {
                    prop_assert!(!line.is_empty());
                    prop_assert!(!line.contains(['\r', '\n']));
                    let _ = parse_line(&line);
                }
                prop_assert!(lb.pending_bytes() <= 32);
            }
        }

        #[test]
        fn every_even_parity_frame_round_trips(raw in any::<u32>(), letter in prop::sample::select(vec!['T', 'B', 'R', 'A'])) {
            let raw = if raw.count_ones() % 2 == 1 { raw ^ (1 << 31) } else { raw };
            let line = format!("{letter}{raw:08X}");
            match parse_line(&line) {
                Ok(Line::Frame(f)) => {
                    prop_assert_eq!(f.raw, raw);
                    prop_assert_eq!(f.source.letter(), letter);
                    prop_assert_eq!(u32::from(f.msg_type().bits()), (raw >> 28) & 7);
                }
                other => prop_assert!(false, "{line}: {other:?}"),
            }
        }
    }

    fn decode_all(d: &mut Decoder, lines: &[&str]) -> (Vec<Reported>, Vec<(&'static str, Fixed)>) {
        let mut reported = Vec::new();
        let mut values = Vec::new();
        for line in lines {
            if let Ok(Line::Frame(f)) = parse_line(line) {
                let out = d.frame(f);
                reported.extend(out.reported);
                values.extend(out.values);
            }
        }
        (reported, values)
    }

    fn decoder() -> Decoder {
        Decoder::new(Mode::Automatic, Mode::Manual, Mode::Manual)
    }

    fn mode(m: Mode) -> Reported {
        Reported {
            mode: Some(m),
            ..Reported::default()
        }
    }

    #[test]
    fn decoder_turns_the_worked_example_into_exact_changes() {
        let mut d = Decoder::new(Mode::Automatic, Mode::Boost, Mode::Manual);
        let (reported, values) = decode_all(&mut d, &WORKED_EXAMPLE);
        let status = Reported {
            load_state: Some(LoadState::Active),
            function: Some(Function::Heating),
            ..Reported::default()
        };
        let sp = |v| Reported {
            setpoint: Some(celsius(v)),
            ..Reported::default()
        };
        let temp = Reported {
            temperature: Some(celsius(1998)),
            ..Reported::default()
        };
        // Line 14 (A, id 9, 21.5) starts a temporary override (flags not seen yet → temporary);
        // line 17 (A, id 100 flags 0b11) confirms it.
        assert_eq!(
            reported,
            vec![
                status,
                sp(2050),
                temp,
                mode(Mode::Boost),
                mode(Mode::Boost),
                sp(2150)
            ]
        );
        assert_eq!(d.override_state(), Some(Override::Temporary));
        assert_eq!(
            values,
            vec![
                ("control_setpoint", Fixed(4550)),
                ("relative_modulation", Fixed(3750)),
                ("override_setpoint", Fixed(2150)),
            ]
        );
    }

    #[test]
    fn a_boiler_answer_to_id_9_is_superseded_by_the_gateways() {
        let mut d = decoder();
        // The boiler supports id 9 and says "no override"; the gateway answers 21.5 (TC).
        let (r, _) = decode_all(&mut d, &["T00090000", "BC0090000", "AC0091580"]);
        assert_eq!(r, vec![mode(Mode::Manual)]);
        // Flags 0b01: constant.
        let (r, _) = decode_all(&mut d, &["T80640000", "B70640000", "A40640101"]);
        assert_eq!(r, vec![mode(Mode::Manual)]);
        assert_eq!(d.override_state(), Some(Override::Constant));
        // The boiler alone (no gateway override): its answer counts, at the next frame.
        let (r, _) = decode_all(&mut d, &["T00090000", "BC0090000"]);
        assert!(r.is_empty(), "held until the next frame");
        let (r, _) = decode_all(&mut d, &["T901813FB"]);
        assert_eq!(r[0], mode(Mode::Automatic));
        assert_eq!(d.override_state(), Some(Override::None));
    }

    #[test]
    fn idle_gateway_reports_no_override() {
        let mut d = decoder();
        let (r, _) = decode_all(&mut d, &["T00090000", "BF0090000", "AC0090000"]);
        assert_eq!(r, vec![mode(Mode::Automatic)]);
    }

    #[test]
    fn known_ids_cover_the_table() {
        for id in [0, 1, 5, 9, 16, 17, 24, 25, 33, 48, 57, 100, 116, 127] {
            assert!(is_known_id(id), "{id}");
        }
        for id in [34, 60, 103, 200, 255] {
            assert!(!is_known_id(id), "{id}");
        }
    }

    proptest! {
        /// Any frame sequence: no panic, and every output carries at least one field.
        #[test]
        fn decoder_never_panics(raws in proptest::collection::vec((0u8..4, any::<u32>()), 0..64)) {
            let mut d = decoder();
            for (s, raw) in raws {
                let source = [Source::Thermostat, Source::Boiler, Source::Request, Source::Answer][usize::from(s)];
                for r in d.frame(Frame { source, raw }).reported {
                    prop_assert!(!r.is_empty());
                }
            }
        }
    }
}

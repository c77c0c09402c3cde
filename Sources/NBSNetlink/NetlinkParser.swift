internal import CMnl
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Why bytes could not be read as netlink.
public enum NetlinkParseError: Error, Sendable, Hashable {
    /// Fewer bytes remain than a netlink header (16) needs.
    case truncatedHeader(offset: Int, available: Int)
    /// nlmsg_len is smaller than the header or runs past the end of the buffer.
    case invalidMessageLength(offset: Int, length: UInt32, available: Int)
    /// The fixed part of the payload (ifinfomsg, ifaddrmsg, nlmsgerr...) is cut short.
    case truncatedPayload(messageType: UInt16, needed: Int, available: Int)
    /// An attribute header or nla_len runs past the end of its message.
    case malformedAttribute(messageType: UInt16, offset: Int)
    /// A fixed-size attribute has the wrong size (e.g. a 5-byte IPv4 address).
    case invalidAttributeLength(messageType: UInt16, attribute: UInt16, length: Int)
    /// An address message has neither IFA_LOCAL nor IFA_ADDRESS.
    case missingAddress(messageType: UInt16)
}

/// The fields of `struct nlmsghdr`.
public struct NetlinkHeader: Sendable, Hashable {
    public var length: UInt32
    public var type: UInt16
    public var flags: UInt16
    public var sequence: UInt32
    public var portID: UInt32

    /// NLM_F_DUMP_INTR: the kernel's table changed while this dump was being produced.
    public var isDumpInterrupted: Bool { flags & UInt16(NLM_F_DUMP_INTR) != 0 }
}

/// One netlink message, turned into Swift.
public enum NetlinkMessage: Sendable, Hashable {
    case newLink(NetworkInterface)
    case delLink(NetworkInterface)
    /// `interfaceName` holds IFA_LABEL when the kernel sent one (IPv4), otherwise "".
    case newAddress(InterfaceAddress)
    case delAddress(InterfaceAddress)
    /// NLMSG_DONE: the end of a dump.
    case done
    /// NLMSG_ERROR with error 0.
    case ack
    /// NLMSG_ERROR with a nonzero error, or NLMSG_DONE carrying one; the value is a positive errno.
    case error(errno: Int32)
    /// A message type (or link/address family) the monitor has no use for. Never fatal.
    case other(type: UInt16)
    /// A message whose header was sound but whose payload was not; the rest of the buffer was
    /// still parsed.
    case malformed(type: UInt16, NetlinkParseError)
}

/// Parses a buffer holding zero or more netlink messages (one `recv` datagram, or a capture).
///
/// Framing errors (a truncated header, an nlmsg_len that is too small or runs past the end) throw,
/// because nothing after them can be located. A message whose own payload is bad becomes
/// `.malformed` and parsing continues with the next one. Never reads outside `bytes`.
public func parseNetlinkMessages(_ bytes: [UInt8]) throws(NetlinkParseError) -> [NetlinkMessage] {
    try parseNetlinkMessagesWithHeaders(bytes).map(\.message)
}

/// As ``parseNetlinkMessages(_:)``, keeping each message's header (sequence numbers and flags are
/// what tell a dump reply from an event).
public func parseNetlinkMessagesWithHeaders(_ bytes: [UInt8]) throws(NetlinkParseError) -> [(header: NetlinkHeader, message: NetlinkMessage)] {
    // libmnl rounds lengths up to 4 (MNL_ALIGN) before comparing them with the message end, so a
    // last message with an unaligned nlmsg_len could make it look up to 3 bytes past the buffer.
    // Padding a copy keeps every such look inside memory we own; `count` still bounds the parse.
    let count = bytes.count
    var storage = bytes
    storage.append(contentsOf: [0, 0, 0, 0, 0, 0, 0, 0])
    let result: Result<[(header: NetlinkHeader, message: NetlinkMessage)], NetlinkParseError> =
        storage.withUnsafeBytes { raw in
            guard let base = raw.baseAddress else { return .success([]) }
            var messages: [(header: NetlinkHeader, message: NetlinkMessage)] = []
            var remaining = Int32(clamping: count)
            var nlh = UnsafeMutablePointer(mutating: base.assumingMemoryBound(to: nlmsghdr.self))
            while remaining > 0 {
                let offset = UnsafeRawPointer(nlh) - base
                if Int(remaining) < Int(cmnl_nlmsg_hdrlen()) {
                    return .failure(.truncatedHeader(offset: offset, available: Int(remaining)))
                }
                guard cmnl_nlmsg_ok(nlh, remaining) else {
                    return .failure(.invalidMessageLength(
                        offset: offset, length: nlh.pointee.nlmsg_len, available: Int(remaining)))
                }
                let header = NetlinkHeader(
                    length: nlh.pointee.nlmsg_len, type: nlh.pointee.nlmsg_type, flags: nlh.pointee.nlmsg_flags,
                    sequence: nlh.pointee.nlmsg_seq, portID: nlh.pointee.nlmsg_pid)
                messages.append((header, parseOne(nlh)))
                // mnl_nlmsg_next subtracts the aligned length; an unaligned final message drives
                // `remaining` below zero, which ends the loop.
                nlh = mnl_nlmsg_next(nlh, &remaining)
            }
            return .success(messages)
        }
    return try result.get()
}

// MARK: - Per message

private func parseOne(_ nlh: UnsafePointer<nlmsghdr>) -> NetlinkMessage {
    let type = nlh.pointee.nlmsg_type
    do throws(NetlinkParseError) {
        switch Int32(type) {
        case NLMSG_DONE:
            // Since Linux 4.x the DONE payload is an int that is negative when the dump failed.
            guard mnl_nlmsg_get_payload_len(nlh) >= MemoryLayout<Int32>.size else { return .done }
            let code = UnsafeRawPointer(mnl_nlmsg_get_payload(nlh)!).loadUnaligned(as: Int32.self)
            return code < 0 ? .error(errno: positiveErrno(code)) : .done
        case NLMSG_ERROR:
            let available = mnl_nlmsg_get_payload_len(nlh)
            guard available >= MemoryLayout<Int32>.size else {
                throw .truncatedPayload(messageType: type, needed: 4, available: available)
            }
            let code = UnsafeRawPointer(mnl_nlmsg_get_payload(nlh)!).loadUnaligned(as: Int32.self)
            return code == 0 ? .ack : .error(errno: positiveErrno(code))
        case Int32(RTM_NEWLINK), Int32(RTM_DELLINK):
            guard let link = try parseLink(nlh) else { return .other(type: type) }
            return Int32(type) == Int32(RTM_NEWLINK) ? .newLink(link) : .delLink(link)
        case Int32(RTM_NEWADDR), Int32(RTM_DELADDR):
            guard let address = try parseAddress(nlh) else { return .other(type: type) }
            return Int32(type) == Int32(RTM_NEWADDR) ? .newAddress(address) : .delAddress(address)
        default:
            return .other(type: type)
        }
    } catch {
        return .malformed(type: type, error)
    }
}

/// The kernel sends -errno; a corrupt message may hold Int32.min, whose negation overflows.
private func positiveErrno(_ code: Int32) -> Int32 {
    Int32(clamping: abs(Int64(code)))
}

/// Walks the attributes after a fixed header of `fixedLength` bytes, stopping at the first one
/// libmnl's bounds check refuses and reporting it.
private func forEachAttribute(
    _ nlh: UnsafePointer<nlmsghdr>, fixedLength: Int,
    _ body: (_ type: UInt16, _ payload: UnsafeRawBufferPointer) throws(NetlinkParseError) -> Void
) throws(NetlinkParseError) {
    var attr = cmnl_attr_first(nlh, fixedLength)!
    while cmnl_attr_ok(nlh, attr) {
        let payload = UnsafeRawBufferPointer(
            start: mnl_attr_get_payload(attr), count: Int(mnl_attr_get_payload_len(attr)))
        try body(mnl_attr_get_type(attr), payload)
        attr = cmnl_attr_next(attr)!
    }
    // A well-formed message ends exactly at an attribute boundary (or inside the last one's
    // padding); anything else is an attribute whose length lies.
    if cmnl_attr_remaining(nlh, attr) > 0 {
        throw .malformedAttribute(
            messageType: nlh.pointee.nlmsg_type, offset: UnsafeRawPointer(attr) - UnsafeRawPointer(nlh))
    }
}

private func fixedHeader<T>(_ nlh: UnsafePointer<nlmsghdr>, as: T.Type) throws(NetlinkParseError) -> T {
    let available = mnl_nlmsg_get_payload_len(nlh)
    guard available >= MemoryLayout<T>.size else {
        throw .truncatedPayload(messageType: nlh.pointee.nlmsg_type, needed: MemoryLayout<T>.size, available: available)
    }
    return UnsafeRawPointer(mnl_nlmsg_get_payload(nlh)!).loadUnaligned(as: T.self)
}

/// Attribute strings are NUL-terminated by the kernel, but a capture or a bug may not be; stop at
/// the first NUL or the attribute end, whichever comes first.
private func attributeString(_ payload: UnsafeRawBufferPointer) -> String {
    let bytes = payload.prefix { $0 != 0 }
    return String(decoding: bytes, as: UTF8.self)
}

private func parseLink(_ nlh: UnsafePointer<nlmsghdr>) throws(NetlinkParseError) -> NetworkInterface? {
    let ifi = try fixedHeader(nlh, as: ifinfomsg.self)
    // The bridge driver sends RTM_NEWLINK/RTM_DELLINK with family AF_BRIDGE to the same group to
    // describe port state; an AF_BRIDGE DELLINK means "left the bridge", not "link deleted".
    guard ifi.ifi_family == UInt8(AF_UNSPEC) else { return nil }
    let type = nlh.pointee.nlmsg_type
    var name = ""
    var operState: UInt8?
    try forEachAttribute(nlh, fixedLength: MemoryLayout<ifinfomsg>.size) { (attrType, payload) throws(NetlinkParseError) in
        switch Int(attrType) {
        case Int(IFLA_IFNAME):
            name = attributeString(payload)
        case Int(IFLA_OPERSTATE):
            guard payload.count == 1 else {
                throw .invalidAttributeLength(messageType: type, attribute: attrType, length: payload.count)
            }
            operState = payload[0]
        default:
            break
        }
    }
    let flags = ifi.ifi_flags
    let adminAndCarrier = flags & UInt32(IFF_UP) != 0 && flags & UInt32(IFF_RUNNING) != 0
    let operOK = operState.map { $0 == UInt8(CMNL_IF_OPER_UP) || $0 == UInt8(CMNL_IF_OPER_UNKNOWN) } ?? true
    return NetworkInterface(
        index: ifi.ifi_index, name: name, isUp: adminAndCarrier && operOK,
        isLoopback: flags & UInt32(IFF_LOOPBACK) != 0, flags: flags, operState: operState ?? 0)
}

private func parseAddress(_ nlh: UnsafePointer<nlmsghdr>) throws(NetlinkParseError) -> InterfaceAddress? {
    let ifa = try fixedHeader(nlh, as: ifaddrmsg.self)
    let family: AddressFamily
    switch Int32(ifa.ifa_family) {
    case AF_INET: family = .inet
    case AF_INET6: family = .inet6
    default: return nil
    }
    let type = nlh.pointee.nlmsg_type
    var local: [UInt8]?
    var peer: [UInt8]?
    var label = ""
    var flags = UInt32(ifa.ifa_flags)
    try forEachAttribute(nlh, fixedLength: MemoryLayout<ifaddrmsg>.size) { (attrType, payload) throws(NetlinkParseError) in
        switch Int(attrType) {
        case Int(IFA_LOCAL), Int(IFA_ADDRESS):
            guard payload.count == family.addressLength else {
                throw .invalidAttributeLength(messageType: type, attribute: attrType, length: payload.count)
            }
            if Int(attrType) == Int(IFA_LOCAL) { local = Array(payload) } else { peer = Array(payload) }
        case Int(IFA_LABEL):
            label = attributeString(payload)
        case Int(IFA_FLAGS):
            guard payload.count == 4 else {
                throw .invalidAttributeLength(messageType: type, attribute: attrType, length: payload.count)
            }
            flags = payload.loadUnaligned(as: UInt32.self)
        default:
            break
        }
    }
    // IFA_LOCAL is the address of this host; IFA_ADDRESS is the far end on point-to-point links
    // and equal to IFA_LOCAL otherwise. IPv6 usually sends only IFA_ADDRESS, which is then local.
    guard let bytes = local ?? peer else { throw .missingAddress(messageType: type) }
    return InterfaceAddress(
        interfaceIndex: Int32(bitPattern: ifa.ifa_index), interfaceName: label, family: family,
        address: formatAddress(bytes, family: family), prefixLength: ifa.ifa_prefixlen,
        scope: ifa.ifa_scope, flags: flags)
}

func formatAddress(_ bytes: [UInt8], family: AddressFamily) -> String {
    var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
    let ok = bytes.withUnsafeBytes { raw in
        inet_ntop(family.rawValue, raw.baseAddress, &text, socklen_t(text.count)) != nil
    }
    guard ok else { return "" }
    return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

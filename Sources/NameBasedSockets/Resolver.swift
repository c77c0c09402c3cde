import NBSNetlink
import NBSProtocol
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Turns a name into every address it has. Injectable so tests can pin addresses; the real one is
/// the system resolver, so /etc/hosts and /etc/netns/NS/hosts apply.
public protocol NameResolver: Sendable {
    func resolve(_ name: String, port: Int) async throws -> [SocketAddress]
}

/// getaddrinfo, run off the event loops: all A and AAAA records, de-duplicated, in resolver order.
public struct SystemResolver: NameResolver {
    public init() {}

    public func resolve(_ name: String, port: Int) async throws -> [SocketAddress] {
        if let literal = try? SocketAddress(ipAddress: name, port: port) { return [literal] }
        return try await NIOThreadPool.singleton.runIfActive {
            try Self.getaddrinfo(name, port: port)
        }
    }

    static func getaddrinfo(_ name: String, port: Int) throws -> [SocketAddress] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        #if canImport(Darwin)
        hints.ai_socktype = SOCK_STREAM
        #else
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        #endif
        var result: UnsafeMutablePointer<addrinfo>?
        let status = Glibc.getaddrinfo(name, String(port), &hints, &result)
        guard status == 0, let first = result else {
            let reason = String(cString: gai_strerror(status))
            throw NBSError.nameResolutionFailed(name: name, reason: reason)
        }
        defer { freeaddrinfo(first) }
        var addresses: [SocketAddress] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let info = cursor {
            cursor = info.pointee.ai_next
            guard let sa = info.pointee.ai_addr else { continue }
            let address: SocketAddress?
            switch Int32(sa.pointee.sa_family) {
            case AF_INET:
                address = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { SocketAddress($0.pointee, host: name) }
            case AF_INET6:
                address = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { SocketAddress($0.pointee, host: name) }
            default:
                address = nil
            }
            if let address, !addresses.contains(address) { addresses.append(address) }
        }
        guard !addresses.isEmpty else { throw NBSError.nameResolutionFailed(name: name, reason: "no A or AAAA records") }
        return addresses
    }
}

/// A fixed table, for tests and for hosts whose peers are configured by address.
public struct StaticResolver: NameResolver {
    public var table: [String: [String]]
    public init(_ table: [String: [String]]) {
        self.table = Dictionary(uniqueKeysWithValues: table.map { (canonicalName($0.key), $0.value) })
    }

    public func resolve(_ name: String, port: Int) async throws -> [SocketAddress] {
        guard let ips = table[canonicalName(name)], !ips.isEmpty else {
            throw NBSError.nameResolutionFailed(name: name, reason: "not in the static table")
        }
        return try ips.map { try SocketAddress(ipAddress: $0, port: port) }
    }
}

/// The host's addresses that subflows may start from, with the interface that owns each.
struct LocalAddressBook: Sendable {
    var entries: [(address: SocketAddress, interface: String)]

    /// From the interface monitor when there is one (the same view that later events update),
    /// else from the system's interface list.
    static func current(monitor: (any InterfaceMonitor)?) -> LocalAddressBook {
        if let monitor {
            return LocalAddressBook(entries: PathPlanner.localAddresses(from: monitor.snapshot))
        }
        let devices = (try? System.enumerateDevices()) ?? []
        var entries: [(SocketAddress, String)] = []
        for device in devices {
            guard let address = device.address, address.ipAddress != nil, !address.isLinkLocalAddress else { continue }
            let plain = address.withPort(0)
            if !entries.contains(where: { $0.0 == plain }) { entries.append((plain, device.name)) }
        }
        return LocalAddressBook(entries: entries)
    }

    var addresses: [SocketAddress] { entries.map(\.address) }

    func matches(_ others: [(address: SocketAddress, interface: String)]) -> Bool {
        entries.count == others.count && zip(entries, others).allSatisfy { $0.address == $1.address && $0.interface == $1.interface }
    }

    mutating func add(_ address: SocketAddress, interface: String) -> Bool {
        guard !entries.contains(where: { $0.address == address }) else { return false }
        entries.append((address, interface))
        return true
    }

    mutating func remove(_ ip: String) -> Bool {
        let before = entries.count
        entries.removeAll { $0.address.hostString == ip }
        return entries.count != before
    }

    func interface(for address: SocketAddress) -> String? {
        let plain = address.withPort(0)
        if let hit = entries.first(where: { $0.address == plain })?.interface { return hit }
        return address.isLoopbackAddress ? "lo" : nil
    }
}

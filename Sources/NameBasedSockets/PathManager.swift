import NBSNetlink
import NIOCore

/// The path manager's decisions as pure functions of the session's state: which subflows should
/// exist, and which must go when an address or interface does. The engine performs them.
enum PathPlanner {
    struct Pair: Hashable, Sendable {
        var local: String
        var remote: String
    }

    struct Join: Equatable, Sendable {
        var local: SocketAddress
        var remote: SocketAddress
        var backup: Bool
    }

    /// The full mesh of same-family pairs, minus the pairs in use or being connected, within the
    /// subflow limit. Loopback addresses pair only with loopback peers. When the limit cuts the mesh,
    /// pairs are taken so that every local and every remote address gets a subflow before any gets
    /// a second, and a local address prefers the remote that shares its longest prefix (on a
    /// multihomed host that is usually the path through its own interface). Under `handover` every
    /// new subflow is a backup while a regular one exists.
    static func joins(locals: [SocketAddress], peers: [SocketAddress], inUse: Set<Pair>, liveCount: Int, maxSubflows: Int,
                      policy: MultipathPolicy, hasRegularSubflow: Bool) -> [Join] {
        var candidates: [(local: SocketAddress, remote: SocketAddress, prefix: Int, order: Int)] = []
        for remote in peers {
            for local in locals where local.canPair(with: remote) {
                guard !inUse.contains(Pair(local: local.hostString, remote: remote.hostString)) else { continue }
                candidates.append((local, remote, commonPrefixLength(local, remote), candidates.count))
            }
        }
        var localUse: [String: Int] = [:]
        var remoteUse: [String: Int] = [:]
        for pair in inUse {
            localUse[pair.local, default: 0] += 1
            remoteUse[pair.remote, default: 0] += 1
        }
        var result: [Join] = []
        var regular = hasRegularSubflow
        var budget = maxSubflows - liveCount
        while budget > 0, !candidates.isEmpty {
            let best = candidates.indices.min { a, b in
                let x = candidates[a], y = candidates[b]
                let useX = localUse[x.local.hostString, default: 0] + remoteUse[x.remote.hostString, default: 0]
                let useY = localUse[y.local.hostString, default: 0] + remoteUse[y.remote.hostString, default: 0]
                if useX != useY { return useX < useY }
                if x.prefix != y.prefix { return x.prefix > y.prefix }
                return x.order < y.order
            }!
            let chosen = candidates.remove(at: best)
            localUse[chosen.local.hostString, default: 0] += 1
            remoteUse[chosen.remote.hostString, default: 0] += 1
            result.append(Join(local: chosen.local, remote: chosen.remote, backup: policy == .handover && regular))
            regular = true
            budget -= 1
        }
        return result
    }

    /// The pairs an open tries, in this order (`OpenRace` staggers them): every local and every remote
    /// address before any twice, the peer's addresses in the resolver's order (which already holds
    /// the system's preferences, RFC 6724), each from the local address that shares its longest
    /// prefix, and no pair whose local and remote addresses were both tried already. An open used
    /// to try each remote address from the first local address only, so a client whose first
    /// interface was silently dead failed on every address of the peer although its second
    /// interface worked (a blackhole on path 1 in the namespaces: four addresses, four timeouts).
    static func openAttempts(locals: [SocketAddress], remotes: [SocketAddress]) -> [Join] {
        typealias Candidate = (local: SocketAddress, remote: SocketAddress, rank: Int, prefix: Int, order: Int)
        var candidates: [Candidate] = []
        for (rank, remote) in remotes.enumerated() {
            for local in locals where local.canPair(with: remote) {
                candidates.append((local, remote, rank, commonPrefixLength(local, remote), candidates.count))
            }
        }
        var triedLocals: Set<String> = [], triedRemotes: Set<String> = []
        func tried(_ c: Candidate) -> Int {
            (triedLocals.contains(c.local.hostString) ? 1 : 0) + (triedRemotes.contains(c.remote.hostString) ? 1 : 0)
        }
        var attempts: [Join] = []
        while let best = candidates.indices.min(by: { a, b in
            let x = candidates[a], y = candidates[b]
            if tried(x) != tried(y) { return tried(x) < tried(y) }
            if x.rank != y.rank { return x.rank < y.rank }
            if x.prefix != y.prefix { return x.prefix > y.prefix }
            return x.order < y.order
        }) {
            let chosen = candidates.remove(at: best)
            guard tried(chosen) < 2 else { break }
            triedLocals.insert(chosen.local.hostString)
            triedRemotes.insert(chosen.remote.hostString)
            attempts.append(Join(local: chosen.local, remote: chosen.remote, backup: false))
        }
        return attempts
    }

    /// With the subflow limit reached, a local address that has no subflow at all (say, an
    /// interface that came back) should not be left out while another local address has two: the
    /// doubled-up subflow that least matches its peer's prefix is the one to replace.
    static func replacement(locals: [SocketAddress], peers: [SocketAddress], live: [(id: UInt32, local: SocketAddress, remote: SocketAddress)],
                            maxSubflows: Int) -> (retire: UInt32, for: SocketAddress)? {
        guard live.count >= maxSubflows else { return nil }
        let used = Dictionary(grouping: live, by: { $0.local.hostString })
        guard let uncovered = locals.first(where: { local in
            used[local.hostString] == nil && peers.contains { local.canPair(with: $0) }
        }) else { return nil }
        let doubled = live.filter { (used[$0.local.hostString]?.count ?? 0) >= 2 }
        guard let victim = doubled.min(by: { commonPrefixLength($0.local, $0.remote) < commonPrefixLength($1.local, $1.remote) }) else { return nil }
        return (victim.id, uncovered)
    }

    /// At the limit, a subflow to a remote address that shares much less of its local address's
    /// prefix than another, unused, remote does (a cross pair taken while the direct peer address
    /// was unknown, e.g. before the peer re-announced it) gives way to the better pair.
    static func upgrade(peers: [SocketAddress], live: [(id: UInt32, local: SocketAddress, remote: SocketAddress)],
                        maxSubflows: Int) -> UInt32? {
        guard live.count >= maxSubflows else { return nil }
        let inUse = Set(live.map { Pair(local: $0.local.hostString, remote: $0.remote.hostString) })
        return live.first { hasCloserPeer($0.local, $0.remote, peers: peers, inUse: inUse) }?.id
    }

    /// Connects in progress over pairs that `upgrade` would replace as soon as they were up: the
    /// peer announced a closer address meanwhile. A link that comes back gets its local addresses
    /// a few ms before the peer's ADD_ADDR for its own side of the link, so the first joins went to
    /// the peer's other addresses (cross pairs over the other path), took the slots, and were
    /// replaced once up, about 1.5 s after the return. Given up, they leave the slots to the closer pairs.
    static func outdated(connecting: some Collection<Pair>, peers: [SocketAddress], inUse: Set<Pair>) -> [Pair] {
        connecting.filter { pair in
            guard let local = try? SocketAddress(ipAddress: pair.local, port: 0),
                  let remote = try? SocketAddress(ipAddress: pair.remote, port: 0) else { return false }
            return hasCloserPeer(local, remote, peers: peers, inUse: inUse)
        }
    }

    /// A peer address of the same family, not paired with `local` yet, that shares at least a
    /// byte more of `local`'s prefix than `remote` does.
    private static func hasCloserPeer(_ local: SocketAddress, _ remote: SocketAddress, peers: [SocketAddress], inUse: Set<Pair>) -> Bool {
        let current = commonPrefixLength(local, remote)
        return peers.contains { peer in
            peer.sameFamily(local) && !inUse.contains(Pair(local: local.hostString, remote: peer.hostString))
                && commonPrefixLength(local, peer) >= current + 8
        }
    }

    static func commonPrefixLength(_ a: SocketAddress, _ b: SocketAddress) -> Int {
        guard let x = a.wireAddress?.bytes, let y = b.wireAddress?.bytes, x.count == y.count else { return 0 }
        var bits = 0
        for (p, q) in zip(x, y) {
            let diff = p ^ q
            if diff == 0 {
                bits += 8
                continue
            }
            bits += diff.leadingZeroBitCount
            break
        }
        return bits
    }

    /// Subflows that lose their local address or interface go at once: waiting for TCP to notice
    /// would stall the session for seconds.
    static func affected(by event: InterfaceEvent, subflows: [(id: UInt32, local: String, interface: String?)]) -> (ids: [UInt32], reason: String, removedAddress: String?) {
        switch event {
        case .addressRemoved(let address):
            let ip = normalizedIP(address.address)
            return (subflows.filter { $0.local == ip }.map(\.id), "address \(ip) removed", ip)
        case .interfaceDown(let interface), .interfaceRemoved(let interface):
            return (subflows.filter { $0.interface == interface.name }.map(\.id), "interface \(interface.name) down", nil)
        default:
            return ([], "", nil)
        }
    }

    /// Usable local addresses for subflows from a monitor table: what the monitor deems usable, plus
    /// loopback addresses (usable towards loopback peers only, which `joins` enforces).
    static func localAddresses(from table: InterfaceTable) -> [(address: SocketAddress, interface: String)] {
        var result: [(SocketAddress, String)] = []
        for entry in table.addresses where entry.isUsableForSubflows || (entry.isLoopback && !entry.isTentative) {
            guard let address = try? SocketAddress(ipAddress: normalizedIP(entry.address), port: 0) else { continue }
            if !result.contains(where: { $0.0 == address }) { result.append((address, entry.interfaceName)) }
        }
        return result
    }

    static func normalizedIP(_ text: String) -> String {
        (try? SocketAddress(ipAddress: text, port: 0))?.ipAddress ?? text
    }
}

/// One netlink monitor per process, started on first use, shared by every session.
enum SharedInterfaceMonitor {
    static let instance: (any InterfaceMonitor)? = {
        guard let monitor = try? NetlinkInterfaceMonitor() else { return nil }
        do {
            try monitor.start()
            return monitor
        } catch {
            return nil
        }
    }()
}

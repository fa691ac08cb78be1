"""Fetches reach only the address that was checked: DNS rebinding, without a packet beyond loopback."""
import shutil
import socket
import ssl
import subprocess

import pytest

import fault_server as fs
import web

PUBLIC = '93.184.216.34'  # what the attacker's DNS answers first: a public address, which passes the check
HOP = '93.184.216.35'  # a public-looking host whose connections the test's socket layer takes to loopback


@pytest.fixture
def rebinding(monkeypatch):
    """A resolver whose answer for rebind.test turns from PUBLIC to 127.0.0.1 after the first lookup (hop.test is
    HOP), and a socket layer that records every address asked for and refuses before anything is sent, except
    loopback and HOP (which it connects to loopback)."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    lookups, connects = [], []

    def getaddrinfo(host, port, *args, **kw):
        if host not in ('rebind.test', 'hop.test'):
            return real_getaddrinfo(host, port, *args, **kw)
        lookups.append(host)
        ip = HOP if host == 'hop.test' else PUBLIC if lookups.count(host) == 1 else '127.0.0.1'
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, '', (ip, port))]

    def connect(sock, address):
        connects.append(address[0])
        if address[0] not in ('127.0.0.1', HOP):
            raise ConnectionRefusedError(f'test: no packet to {address[0]}')
        return real_connect(sock, ('127.0.0.1', address[1]))
    monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)
    monkeypatch.setattr(socket.socket, 'connect', connect)
    return lookups, connects


def test_the_connection_goes_to_the_checked_address(rebinding):
    lookups, connects = rebinding
    url, hits, server = fs.start({'/a.jpg': fs.jpeg(64, 64)})
    port = url.rsplit(':', 1)[1]
    try:
        for session in (web.session(2), __import__('requests').Session()):  # the streamer's, and a plain one
            lookups.clear(), connects.clear()
            with pytest.raises(web.Skip) as e:
                web.fetch(session, f'http://rebind.test:{port}/a.jpg', 2.0, 10 ** 6, allow_private=False,
                          honor_robots=True)
            # the first connection went to the address that was checked; a retry looked up again, got loopback,
            # and was refused before connecting
            assert connects and set(connects) == {PUBLIC}, connects
            assert e.value.args[0] in ('private_address', 'connection')
        assert sum(hits.values()) == 0  # no request reached the loopback server
        # a redirect hop is checked the same way
        url2, hits2, server2 = fs.start({'/r.jpg': fs.redirect(f'http://rebind.test:{port}/a.jpg')})
        lookups.clear(), connects.clear()
        with pytest.raises(web.Skip):
            web.fetch(web.session(1), f"http://hop.test:{url2.rsplit(':', 1)[1]}/r.jpg", 2.0, 10 ** 6,
                      allow_private=False, honor_robots=True)
        assert hits2['/r.jpg'] == 1 and set(connects) == {HOP, PUBLIC} and sum(hits.values()) == 0
        server2.shutdown()
    finally:
        server.shutdown()


def test_loopback_still_fetches_where_private_addresses_are_allowed(rebinding):
    _, connects = rebinding
    url, hits, server = fs.start({'/a.jpg': fs.jpeg(64, 64)})
    try:
        s = web.session(2)
        for _ in range(3):
            assert len(web.fetch(s, url + '/a.jpg', 2.0, 10 ** 6, allow_private=True, honor_robots=True)) > 100
        assert hits['/a.jpg'] == 3 and connects == ['127.0.0.1']  # one connection, reused
        with pytest.raises(web.Skip, match='private_address'):  # never reused where private addresses are refused
            web.fetch(s, url + '/a.jpg', 2.0, 10 ** 6, allow_private=False, honor_robots=True)
        assert hits['/a.jpg'] == 3
    finally:
        server.shutdown()


def certificate(tmp_path, name, ca=None):
    """A key and certificate for `name` (DNS), signed by ca=(cert, key) or self-signed; with the openssl tool."""
    key, crt = tmp_path / f'{name}.key', tmp_path / f'{name}.crt'
    base = ['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', str(key), '-out', str(crt),
            '-days', '2', '-subj', f'/CN={name}', '-addext', f'subjectAltName=DNS:{name}']
    if ca:
        base += ['-CA', str(ca[0]), '-CAkey', str(ca[1])]
    else:
        base += ['-addext', 'basicConstraints=critical,CA:TRUE']
    subprocess.run(base, check=True, capture_output=True)
    return crt, key


@pytest.mark.skipif(not shutil.which('openssl'), reason='makes its certificates with the openssl tool')
def test_https_verifies_certificates_over_the_pinned_socket(tmp_path):
    ca = certificate(tmp_path, 'test-ca')
    good = certificate(tmp_path, 'localhost', ca)
    for cert, trusted, ok in ((good, ca[0], True), (ca, None, False), (certificate(tmp_path, 'elsewhere', ca), ca[0],
                                                                         False)):
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(*cert)
        url, hits, server = fs.start({'/a.jpg': fs.jpeg(64, 64)}, tls=tls)
        try:
            s = web.session(1)
            if trusted:
                s.verify = str(trusted)
            url = url.replace('127.0.0.1', 'localhost')
            if ok:  # signed for localhost by a trusted CA: fetched, TLS over the checked socket
                assert len(web.fetch(s, url + '/a.jpg', 5.0, 10 ** 6, True, True)) > 100
            else:  # self-signed, or signed for another name: refused before any request
                with pytest.raises(web.Skip, match='connection'):
                    web.fetch(s, url + '/a.jpg', 5.0, 10 ** 6, True, True)
                assert sum(hits.values()) == 0
        finally:
            server.shutdown()
